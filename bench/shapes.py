"""Benchmark cases: every distinct self-attention shape of SD1.5, SDXL and FLUX.1-dev (SPEC.md "Real shapes").

A case is one FASA call as the adapters make it: ``batch`` PD rows per call. The adapters call FASA once per
guidance half, so one image is B=1 for every model (with the default style_fidelity=1 only the conditional
half calls it at all); the ``-b4`` cases are four images per call (a batch of prompts).
``heads`` x ``head_dim``, and per branch ``n_txt`` text tokens followed by the ``grid`` of image tokens
(row-major). ``layers`` counts the model's self-attention layers of that shape.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

MODELS = ("sd15", "sdxl", "flux")


@dataclass(frozen=True)
class Case:
    model: str
    name: str
    batch: int           # PD rows per call (one per image)
    heads: int
    head_dim: int
    grid: tuple          # (h, w) of the image-token grid
    n_txt: int = 0       # leading text tokens (FLUX joint sequence)
    layers: int = 1      # self-attention layers of this shape in the model
    omega: float = 1.5   # the model family's preset

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_q(self) -> int:
        return self.n_txt + self.n_img

    n_p = n_q  # PD and FD branches carry the same sequence
    n_f = n_q

    @property
    def label(self) -> str:
        txt = f"{self.n_txt}+" if self.n_txt else ""
        batch = f" B={self.batch}" if self.batch > 1 and self.model != "flux" else ""
        return f"{self.model} {txt}{self.n_img} {self.heads}x{self.head_dim}{batch}"


# SPEC.md: SD1.5 at 512 (latent 64x64): 4096 (5 layers), 1024 (5), 256 (5), mid 64 (1); 8 heads x 40/80/160.
SD15 = (
    Case("sd15", "sd15-4096", 1, 8, 40, (64, 64), layers=5, omega=0.5),
    Case("sd15", "sd15-1024", 1, 8, 80, (32, 32), layers=5, omega=0.5),
    Case("sd15", "sd15-256", 1, 8, 160, (16, 16), layers=5, omega=0.5),
    Case("sd15", "sd15-mid64", 1, 8, 160, (8, 8), layers=1, omega=0.5),
)
# SDXL at 1024 (latent 128x128): 10 x 64 at 4096 (10 layers), 20 x 64 at 1024 (60 layers).
SDXL = (
    Case("sdxl", "sdxl-4096", 1, 10, 64, (64, 64), layers=10, omega=1.5),
    Case("sdxl", "sdxl-1024", 1, 20, 64, (32, 32), layers=60, omega=1.5),
)
# FLUX.1-dev at 1024: 24 x 128, 512 text + 4096 image tokens (64x64 after 2x2 patching), 57 blocks, no CFG.
FLUX = (
    Case("flux", "flux-512+4096", 1, 24, 128, (64, 64), n_txt=512, layers=57, omega=1.5),
)

# Four images per call: the grid-filling case (the B=1 cases above leave SMs idle at 1024 tokens).
BATCHED = {
    "sd15": (replace(SD15[0], name="sd15-4096-b4", batch=4, layers=0),),
    "sdxl": (replace(SDXL[1], name="sdxl-1024-b4", batch=4, layers=0),),
    "flux": (),
}
CASES = {m: cases + BATCHED[m] for m, cases in (("sd15", SD15), ("sdxl", SDXL), ("flux", FLUX))}


def attention_weight(case: Case) -> int:
    """A shape's attention work in one generation: layers x query-key pairs x heads x head dim (the batch
    cases have no layers of their own: 0). Runs cut short by a time limit take the heaviest shapes first."""
    return case.layers * case.n_q * (case.n_p + case.n_f) * case.heads * case.head_dim


def cases_for(models) -> list[Case]:
    """The full-size cases of the named models, in table order."""
    out = []
    for m in models:
        if m not in CASES:
            raise ValueError(f"unknown model {m!r}; choose from {MODELS}")
        out.extend(CASES[m])
    return out


def reduced(case: Case, *, side_div: int = 2, max_heads: int = 2, txt_div: int = 4) -> Case:
    """A CPU-sized version of ``case``: the same head dim, batch and aspect, fewer heads and tokens."""
    h, w = case.grid
    grid = (max(2, h // side_div), max(2, w // side_div))
    return replace(case, name=case.name + "-cpu", heads=min(case.heads, max_heads), grid=grid,
                   n_txt=case.n_txt // txt_div)
