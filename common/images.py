"""PNG bytes <-> PIL images: how images travel in records, cached replies and request parts."""

from __future__ import annotations

import io

from PIL import Image


def image_to_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_to_image(data: bytes | dict) -> Image.Image:
    if isinstance(data, dict):  # datasets Image feature form {"bytes": ..., "path": ...}
        data = data["bytes"]
    return Image.open(io.BytesIO(data)).convert("RGB")
