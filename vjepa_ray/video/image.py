"""Still images as training clips: V-JEPA 2 mixes image data sets into video pretraining as static clips.

The 2.0 release (``src/datasets/video_dataset.py``, ``get_item_image``) reads a ``.jpg``/``.jpeg``/``.png``
sample of any source and repeats it to that source's frames per clip, so an image is a clip in which
nothing moves and it flows through the same tubelet embedding, masks and predictor as a video. That is
what happens here (2.1's separate image path, a single frame through a tubelet-1 patch embedding, exists for
loading 2.1's encoders, whose pretraining is out of scope). Images are read with Pillow, turned upright by
their EXIF orientation (as videos by their rotation), and fail with the decoder's ``VideoSkip`` reasons, so
a bad image is skipped, counted and logged like a bad video.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vjepa_ray.video.decode import ClipSpec, VideoSkip, VideoSource, check_file_size, check_frame_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


def is_image_path(path: str) -> bool:
    """Whether a file name (a path, URI without query, or tar member) names an image by its extension."""
    return os.path.splitext(path.partition("?")[0])[1].lower() in IMAGE_EXTENSIONS


def read_image(source: VideoSource, spec: ClipSpec) -> np.ndarray:
    """uint8 [H, W, 3] RGB, upright; raises VideoSkip (``spec``'s byte and pixel limits hold as for videos)."""
    check_file_size(source, spec)
    if isinstance(source, (bytes, bytearray, memoryview)):
        target = io.BytesIO(source)
    else:
        target = source if hasattr(source, "read") else os.fspath(source)
    try:
        with Image.open(target) as image:
            # The header gives the size before any pixel is decoded.
            check_frame_size(image.width, image.height, spec)
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Image.DecompressionBombError as err:
        raise VideoSkip("too_large_pixels", str(err)) from None
    except UnidentifiedImageError as err:
        raise VideoSkip("corrupt", f"Pillow cannot identify the image: {err}") from None
    except FileNotFoundError as err:
        raise VideoSkip("missing", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged data (SyntaxError: bad PNG chunks)
        raise VideoSkip("corrupt", f"the image does not decode: {err}") from None


def static_clip(frame: np.ndarray, frames: int) -> np.ndarray:
    """uint8 [frames, H, W, 3]: ``frame`` repeated, the 2.0 release's clip of an image."""
    return np.repeat(frame[None], frames, axis=0)
