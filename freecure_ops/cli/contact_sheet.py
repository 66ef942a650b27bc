"""A contact sheet: equal-size images in a grid, with a label above each column and left of each row drawn into
the image (PIL's default font, sized to the images so that a sheet of 1024-pixel portraits is as readable as
one of 64-pixel thumbnails), and the attribute mask shown over an image in a translucent colour.

PIL and numpy only; the layout is a value (:class:`SheetLayout`), so a caller (or a test) can find any cell."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["SheetLayout", "sheet_layout", "contact_sheet", "mask_overlay", "foundation_overlay", "OVERLAY_COLOUR"]

#: the mask's colour: cyan is rare in portraits (a red overlay would vanish in red hair)
OVERLAY_COLOUR = (0, 230, 255)
_BACKGROUND, _MISSING, _INK = (255, 255, 255), (200, 200, 200), (0, 0, 0)


def _font_px(cell_w: int, cell_h: int) -> int:
    # about 1/16 of the cell: 64 px text on 1024 px portraits, never below a legible 12 px
    return max(12, round(min(cell_w, cell_h) / 16))


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ValueError, OSError, ImportError):
        return None


def _text_image(text: str, px: int) -> Image.Image:
    """``text`` in black on white, ``px`` pixels high (the bitmap font scaled up when no scalable one exists)."""
    font = _font(px)
    if font is None:  # PIL's bitmap font (about 11 px): drawn small, scaled up
        font = ImageFont.load_default()
        scale = max(1, round(px / 11))
    else:
        scale = 1
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    img = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 255)
    ImageDraw.Draw(img).text((-x0, -y0), text, font=font, fill=0)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes: cells of ``cell_w`` x ``cell_h`` in ``rows`` x ``cols``, after a left label column
    ``label_w`` wide and a top label row ``label_h`` high, ``gap`` pixels between and around cells; a column is
    ``col_w`` wide (wider than a cell when its label is: the cell is centred in it); labels are ``font_px``
    high, ``pad`` pixels from the cells."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    label_w: int
    label_h: int
    gap: int
    font_px: int
    pad: int
    col_w: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_w + self.cols * (self.col_w + self.gap) + self.gap,
                self.label_h + self.rows * (self.cell_h + self.gap) + self.gap)

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a cell (PIL's crop box)."""
        x = self.label_w + self.gap + col * (self.col_w + self.gap) + (self.col_w - self.cell_w) // 2
        y = self.label_h + self.gap + row * (self.cell_h + self.gap)
        return x, y, x + self.cell_w, y + self.cell_h


def sheet_layout(cell_size: tuple[int, int], row_labels, col_labels) -> SheetLayout:
    """The layout for cells of ``cell_size`` (width, height) and these labels (the label bands fit the text)."""
    cell_w, cell_h = cell_size
    px = _font_px(cell_w, cell_h)
    pad = max(2, px // 3)
    label_w = max((_text_image(t, px).width for t in row_labels), default=0) + 2 * pad
    col_sizes = [_text_image(t, px).size for t in col_labels]
    label_h = max((h for _, h in col_sizes), default=0) + 2 * pad
    col_w = max([cell_w] + [w + 2 * pad for w, _ in col_sizes])  # a label never runs into its neighbour
    return SheetLayout(rows=len(row_labels), cols=len(col_labels), cell_w=cell_w, cell_h=cell_h, label_w=label_w,
                       label_h=label_h, gap=max(2, min(cell_w, cell_h) // 64), font_px=px, pad=pad,
                       col_w=col_w)


def contact_sheet(cells, row_labels, col_labels) -> tuple[Image.Image, SheetLayout]:
    """``cells[row][col]``: PIL images of one size, or None (a cell a failed run did not produce: grey).
    Returns the RGB sheet and its layout."""
    first = next((c for row in cells for c in row if c is not None), None)
    if first is None:
        raise ValueError("a contact sheet needs at least one image")
    layout = sheet_layout(first.size, row_labels, col_labels)
    sheet = Image.new("RGB", layout.size, _BACKGROUND)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            box = layout.cell_box(r, c)
            if img is None:
                sheet.paste(_MISSING, box)
            else:
                sheet.paste(img.convert("RGB"), box[:2])
    for c, text in enumerate(col_labels):  # centred above its column
        t = _text_image(text, layout.font_px)
        x0, _, x1, _ = layout.cell_box(0, c)
        _paste_text(sheet, t, (x0 + x1 - t.width) // 2, (layout.label_h + layout.gap - t.height) // 2)
    for r, text in enumerate(row_labels):  # right-aligned, centred on its row
        t = _text_image(text, layout.font_px)
        _, y0, _, y1 = layout.cell_box(r, 0)
        _paste_text(sheet, t, layout.label_w - layout.pad - t.width, (y0 + y1 - t.height) // 2)
    return sheet, layout


def _paste_text(sheet: Image.Image, text: Image.Image, x: int, y: int) -> None:
    # the text image is ink-on-white: its inverse is the stencil, so the background stays as it is
    sheet.paste(_INK, (x, y, x + text.width, y + text.height), Image.eval(text, lambda v: 255 - v))


def mask_overlay(image: Image.Image, mask, colour=OVERLAY_COLOUR, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask`` (array-like ``[H, W]`` or ``[1, H, W]``, any scale and size; brightest = fully
    masked) laid over it in ``colour`` at ``alpha``."""
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 3:
        m = m[0]
    peak = float(m.max()) if m.size else 0.0
    m = m / peak if peak > 0 else np.zeros_like(m)
    m_img = Image.fromarray((np.clip(m, 0, 1) * 255).round().astype(np.uint8), mode="L")
    if m_img.size != image.size:
        m_img = m_img.resize(image.size, Image.BILINEAR)
    weight = np.asarray(m_img, dtype=np.float32)[..., None] / 255.0 * alpha
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = rgb * (1 - weight) + np.asarray(colour, dtype=np.float32) * weight
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8), mode="RGB")


def foundation_overlay(found, index: int = 0) -> Image.Image:
    """A foundation's FD image ``index`` with its attribute mask over it (the sweep's "FD + mask" row, the demo
    page's FD panel)."""
    mask = found.mask.detach().float().cpu()
    if mask.dim() == 3:
        mask = mask[index]
    return mask_overlay(found.images[index], mask.numpy())
