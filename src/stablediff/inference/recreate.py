"""`generate --from-png`: the request, model and input files that made a PNG, read from its metadata.

Parameters come from the A1111 infotext; where the model, LoRAs, embeddings,
init image and mask were comes from the `stablediff` chunk, and anything the
user names again (MODEL, --lora, --embedding, --init, --mask) takes its place —
e.g. for an A1111 image, or after files moved. LoRAs and embeddings are matched
to the infotext by content hash, so a different file under the same name is
never used silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stablediff.errors import GenerationError, MissingPathError
from stablediff.inference.embedding_files import check_embedding_path
from stablediff.inference.embeddings import EmbeddingSpec
from stablediff.inference.lora import LoraSpec, lora_file
from stablediff.inference.metadata import file_short_hash, read_png_metadata
from stablediff.inference.request import GenerationRequest, embedding_hashes, lora_weights, request_from_infotext


@dataclass(frozen=True)
class Recreation:
    request: GenerationRequest
    model: Path
    step: int | None
    best: bool
    model_hash: str | None  # the hash the image was made with
    init_image: Path | None
    mask: Path | None


def plan_recreation(png: Path, model: Path | None = None, lora_paths: tuple[Path, ...] = (),
                    init_image: Path | None = None, mask: Path | None = None, step: int | None = None,
                    best: bool = False, embedding_paths: tuple[Path, ...] = (),
                    trust_pickle: bool = False) -> Recreation:
    info, locations = read_png_metadata(png)
    if model is None:
        if not locations.get("model"):
            raise GenerationError(f"{png} does not say where its model {info.params.get('Model', '?')!r} (hash "
                                  f"{info.params.get('Model hash', '?')}) is; give it: stablediff generate --from-png "
                                  f"{png} MODEL")
        model, step, best = Path(locations["model"]), locations.get("step"), bool(locations.get("best"))
    loras = _loras(info, locations.get("loras", {}), lora_paths)
    embeddings = _embeddings(info, locations.get("embeddings", {}), embedding_paths, trust_pickle)
    request = request_from_infotext(info, loras, embeddings)
    if request.strength is not None:
        init_image = init_image or _recorded(locations, "init", png, "init image", "--init")
        if "mask" in locations or mask is not None:
            mask = mask or _recorded(locations, "mask", png, "mask", "--mask")
    return Recreation(request, model, step, best, info.params.get("Model hash"), init_image, mask)


def _recorded(locations: dict, key: str, png: Path, what: str, option: str) -> Path:
    path = Path(locations[key]) if locations.get(key) else None
    if path is None or not path.is_file():
        raise MissingPathError(f"{png} was made from the {what} {path or '(not recorded)'}, which is not there "
                               f"now; give it with {option} PATH")
    return path


def _loras(info, recorded_paths: dict[str, str], given: tuple[Path, ...]) -> tuple[LoraSpec, ...]:
    wanted = lora_weights(info)  # name -> (hash, scale)
    paths = _files_by_hash({name: hash_ for name, (hash_, _) in wanted.items()}, recorded_paths,
                           [lora_file(Path(p)) for p in given], "LoRA(s)", "--lora PATH")
    return tuple(LoraSpec(paths[name], scale) for name, (_, scale) in wanted.items())


def _embeddings(info, recorded_paths: dict[str, str], given: tuple[Path, ...],
                trust_pickle: bool) -> tuple[EmbeddingSpec, ...]:
    wanted = embedding_hashes(info)  # name -> hash
    paths = _files_by_hash(wanted, recorded_paths, [check_embedding_path(p, trust_pickle) for p in given],
                           "embedding(s)", "--embedding FILE")
    renamed = [f"{paths[name].name} (the prompt says {name!r})" for name in wanted if paths[name].stem != name]
    if renamed:  # the prompt word of an embedding is its file name
        raise GenerationError(f"the embedding file {renamed[0]} has the right content under another name; its "
                              "prompt word is its file name, so copy it to that name and give the copy")
    return tuple(EmbeddingSpec(paths[name], trust_pickle) for name in wanted)


def _files_by_hash(wanted: dict[str, str], recorded_paths: dict[str, str], given: list[Path], what: str,
                   option: str) -> dict[str, Path]:
    """name -> the file with the infotext's hash: one given again by the user, else the recorded one."""
    by_hash = {file_short_hash(path): path for path in given}
    found, missing = {}, []
    for name, hash_ in wanted.items():
        path = by_hash.get(hash_)
        recorded = Path(recorded_paths[name]) if name in recorded_paths else None
        if path is None and recorded is not None and recorded.is_file() and file_short_hash(recorded) == hash_:
            path = recorded
        if path is None:
            missing.append(f"{name} (hash {hash_})")
        else:
            found[name] = path
    if missing:
        raise MissingPathError(f"the image was made with the {what} {', '.join(missing)}, not found with that "
                               f"hash at their recorded paths; give each file with {option}")
    return found
