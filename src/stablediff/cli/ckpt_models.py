"""`stablediff ckpt export|convert|merge|prune|hash` and `ckpt info FILE`: model files in and out.

A model is a `.safetensors` single file (original SD layout), a diffusers
pipeline folder, or a pickle `.ckpt` (only with --trust-pickle; we never write
one). Heavy imports happen inside the commands so `stablediff --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stablediff.errors import UserError
from stablediff.cli.options import trust_pickle_option
from stablediff.io.pickle_guard import MODEL_FILE_SUFFIXES

out_option = click.option("--out", type=click.Path(path_type=Path), required=True,
                          help="Output: NAME.safetensors for a single file, any other path for a diffusers folder.")
force_option = click.option("--force", is_flag=True, help="Replace OUT if it exists.")
tokenizer_option = click.option("--tokenizer", type=click.Path(path_type=Path, exists=True, file_okay=False),
                                default=None, help="Local CLIP tokenizer folder, for SD 1.x files that have none.")


def is_model_target(target: str) -> bool:
    """A model file or diffusers folder (for `ckpt info`), as opposed to a run directory or store."""
    from stablediff.models.model_tools import is_diffusers_folder  # torch: only when the command runs

    path = Path(target)
    return (path.is_file() and path.suffix.lower() in MODEL_FILE_SUFFIXES) or is_diffusers_folder(path)


def check_out(out: Path, force: bool) -> None:
    """Remove what an interrupted write to OUT left behind (it is ours, never a model), then refuse to
    overwrite OUT without --force."""
    from stablediff.models.atomic_output import clean_leftovers

    for leftover in clean_leftovers(out):
        click.echo(f"removed {leftover}, the partial output of an interrupted write to {out.name}", err=True)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another output path or pass --force to replace it")


def wrote(out: Path, origin: str = "") -> None:
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    click.echo(f"wrote {out} ({size / 2**20:.1f} MiB)" + (f" from {origin}" if origin else ""))


def export_origin(loaded, step: int | None, best: bool) -> str:
    """Which step was exported and why that one: the user asked, it is the best, or the newest that loads."""
    if step is not None:
        return f"step {loaded.step}, as asked"
    if best:
        return f"step {loaded.step}, the best (RUN_DIR/eval.json's mark, else the lowest val_loss)"
    if not loaded.skipped:
        return f"step {loaded.step}, the newest checkpoint"
    newest = loaded.skipped[0]
    more = f" ({len(loaded.skipped)} newer checkpoints skipped)" if len(loaded.skipped) > 1 else ""
    return (f"step {loaded.step}, NOT the newest: step {newest.step} cannot be loaded ({newest.reason}){more}; "
            "see `stablediff ckpt verify`")


def default_format(run_dir: Path) -> str:
    """lora for a LoRA fine-tune (its adapters are what it made), diffusers for everything else."""
    from stablediff.models.finetuned_run import is_finetune_run

    method = finetune_method(run_dir) if is_finetune_run(run_dir) else None
    return {"lora": "lora", "textual_inversion": "embedding"}.get(method, "diffusers")


def finetune_method(run_dir: Path) -> str | None:
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (config.get("finetune") or {}).get("method")


def _is_best(run_dir: Path, loaded) -> bool:
    from stablediff.models.run_export import best_step, open_run_store

    return best_step(open_run_store(run_dir)[0], run_dir) == loaded.step


def show_model_info(target: str, trust_pickle: bool) -> None:
    from stablediff.models.model_tools import model_info

    click.echo(json.dumps(model_info(Path(target), trust_pickle), indent=2, default=str))


LORA_FORMATS = ("lora", "lora-diffusers")  # a fine-tune run's adapters (finetune/lora_files.py)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["diffusers", "single-file", *LORA_FORMATS, "embedding"]),
              default=None, help="lora: one kohya/A1111-layout file (A1111, ComfyUI, diffusers); lora-diffusers: a "
                   "save_lora_weights folder; embedding: a textual-inversion run's TOKEN.safetensors in OUT (a "
                   "folder). Default: lora / embedding for those fine-tunes, else diffusers.")
@click.option("--step", type=click.IntRange(0), default=None,
              help="Which checkpoint (default: the newest; for a fine-tune run, the best when one is marked).")
@click.option("--best", is_flag=True, help="The best checkpoint (RUN_DIR/eval.json's mark, else the lowest val_loss).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="EMA weights or the raw trained weights.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output path (default: RUN_DIR/export/step-N...).")
@force_option
@trust_pickle_option
def export(run_dir: Path, fmt: str, step, best: bool, ema: bool, out: Path | None, force: bool,
           trust_pickle: bool) -> None:
    """Write a run's checkpoint as a diffusers folder, an SD single file, or its LoRA adapters."""
    from stablediff.models.finetuned_run import is_finetune_run
    from stablediff.models.run_export import load_run_checkpoint

    fmt = fmt or default_format(run_dir)
    if fmt in (*LORA_FORMATS, "embedding"):  # no pipeline needed: any checkpoint with the tensors will do
        from stablediff.finetune.lora_files import load_lora_checkpoint

        loaded = load_lora_checkpoint(run_dir, step, best)
    else:
        loaded = load_run_checkpoint(run_dir, step, best)
    best = best or (step is None and is_finetune_run(run_dir) and not loaded.skipped and _is_best(run_dir, loaded))
    weights = "ema" if ema else "raw"
    suffix = {"diffusers": "", "single-file": ".safetensors", "lora": "-lora.safetensors",
              "lora-diffusers": "-lora-diffusers", "embedding": "-embedding"}[fmt]
    out = out or run_dir / "export" / f"step-{loaded.step:06d}-{weights}{suffix}"
    check_out(out, force)
    for note in loaded.notes():
        click.echo(note, err=True)
    write_export(loaded, fmt, out, run_dir, ema, force, trust_pickle)
    wrote(out, export_origin(loaded, step, best))


def write_export(loaded, fmt: str, out: Path, run_dir: Path, ema: bool, force: bool, trust_pickle: bool) -> None:
    from stablediff.models.atomic_output import save_pipeline_folder
    from stablediff.models.run_export import pipeline_from_checkpoint

    source, weights = f"{run_dir} step {loaded.step}", "ema" if ema else "raw"
    if fmt == "embedding":
        from stablediff.finetune.live_captions import write_embedding_export

        write_embedding_export(loaded, out, source)
        return
    if fmt in LORA_FORMATS:
        from stablediff.finetune.lora_files import write_diffusers_lora, write_kohya_lora

        if fmt == "lora":
            write_kohya_lora(loaded, out, source, ema)
        else:
            write_diffusers_lora(loaded, out, source, ema, replace=force)
        return
    pipe = pipeline_from_checkpoint(loaded, ema, trust_pickle, source, run_dir=run_dir)
    if fmt == "diffusers":
        save_pipeline_folder(pipe, out, replace=force, step=loaded.step, weights=weights)
    else:
        from stablediff.models.single_file_pipeline import save_single_file

        # the run's name, not its path: files are shared, and paths tell usernames and layouts
        save_single_file(pipe, out, {"stablediff.run": {"step": loaded.step, "weights": weights,
                                                        "run": run_dir.resolve().name}})


@click.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("out", type=click.Path(path_type=Path))
@force_option
@tokenizer_option
@trust_pickle_option
def convert(source: Path, out: Path, force: bool, tokenizer: Path | None, trust_pickle: bool) -> None:
    """Diffusers folder -> SD single file (OUT.safetensors), or single file -> diffusers folder (OUT).

    A .ckpt (with --trust-pickle) -> OUT.safetensors keeps its tensors as they are.
    """
    from stablediff.models.atomic_output import save_pipeline_folder
    from stablediff.models.state_dict_file import read_model_file
    from stablediff.models.single_file_pipeline import load_single_file_pipeline, save_single_file, write_safetensors

    check_out(out, force)
    to_file = out.suffix.lower() == ".safetensors"
    if source.is_dir():
        if not to_file:
            raise UserError(f"{source} is a folder, so the output must be a single file: name it "
                            f"{out.with_suffix('.safetensors').name}")
        from stablediff.models.pipeline_assembly import load_pipeline_folder

        save_single_file(load_pipeline_folder(source, trust_pickle), out)
    elif to_file:
        state, metadata = read_model_file(source, trust_pickle)
        write_safetensors(state, metadata, out)
    else:
        if out.suffix.lower() in MODEL_FILE_SUFFIXES:
            raise UserError(f"{out}: stablediff writes safetensors or diffusers folders, never pickles; "
                            "name the output .safetensors or give a folder name")
        save_pipeline_folder(load_single_file_pipeline(source, trust_pickle, tokenizer=tokenizer), out, force)
    wrote(out)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--method", type=click.Choice(["weighted", "add-difference"]), default="weighted", show_default=True,
              help="weighted: (1-alpha)*A + alpha*B;  add-difference: A + alpha*(B - C).")
@click.option("--alpha", type=float, default=0.5, show_default=True)
@out_option
@force_option
@trust_pickle_option
def merge(models: tuple[Path, ...], method: str, alpha: float, out: Path, force: bool, trust_pickle: bool) -> None:
    """Merge models A B [C] of the same architecture; the recipe goes into OUT's metadata."""
    from stablediff.models.model_tools import merge_files, write_model

    check_out(out, force)
    state, metadata = merge_files(list(models), method, alpha, trust_pickle)
    write_model(state, metadata, out, f"merge of {', '.join(map(str, models))}", replace=force)
    wrote(out)


@click.command()
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Cast floating-point weights (fp16 halves the size).")
@click.option("--ema-only", is_flag=True, help="Keep the EMA weights (model_ema.*) as the UNet, drop the rest.")
@force_option
@trust_pickle_option
def prune(source: Path, out: Path, dtype: str | None, ema_only: bool, force: bool, trust_pickle: bool) -> None:
    """Keep only what inference needs: UNet, VAE, text encoder (no EMA copy, optimizer or training junk)."""
    from stablediff.models.model_tools import DTYPES, prune_state, read_model, write_model

    check_out(out, force)
    state, metadata = read_model(source, trust_pickle)
    pruned, dropped = prune_state(state, DTYPES.get(dtype or ""), ema_only, str(source))
    write_model(pruned, metadata, out, str(source), replace=force)
    if dropped:
        click.echo("dropped " + ", ".join(f"{n} {group}*" for group, n in sorted(dropped.items())))
    wrote(out)


@click.command(name="hash")
@click.argument("file", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the hashes as JSON.")
def hash_cmd(file: Path, as_json: bool) -> None:
    """SHA-256 of FILE, its 10-digit short form (Civitai AutoV2) and A1111's legacy 8-digit hash."""
    from stablediff.models.file_hash import file_hashes

    hashes = file_hashes(file)
    if as_json:
        click.echo(json.dumps({"file": str(file), **hashes}))
        return
    click.echo(f"{hashes['sha256']}  {file}")
    click.echo(f"autov2 {hashes['autov2']}")
    click.echo(f"legacy {hashes['legacy']}")


def register(group: click.Group) -> None:
    for command in (export, convert, merge, prune, hash_cmd):
        group.add_command(command)
