from stablediff.config.loader import ConfigError, dump_config, load_config
from stablediff.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "dump_config", "load_config"]
