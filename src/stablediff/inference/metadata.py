"""PNG metadata in the A1111 "infotext" form, so other tools read the parameters back.

    a handwritten digit seven
    Negative prompt: blurry
    Steps: 20, Sampler: dpmpp_2m, CFG scale: 3.0, Seed: 7, Size: 32x32, Model: digits
"""

from __future__ import annotations

from PIL import PngImagePlugin


def infotext(prompt: str, negative_prompt: str | None, params: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in params.items()))
    return "\n".join(lines)


def png_info(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info
