"""The benchmark cases: BENCHMARKS.md's public ones, plus the shapes issue 5 asks for.

Only the parameters live here (this module imports neither Keras nor fastconv, so the runner stays
light); the worker derives output sizes from fastconv.geometry and counts FLOPs as BENCHMARKS.md
does.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: str = "same"
    data_format: str = "channels_last"
    public: bool = False  # one of BENCHMARKS.md's public cases
    small: bool = False  # a small layer: per-call overhead matters more than GFLOP/s
    note: str = ""

    @property
    def input_shape(self):
        if self.data_format == "channels_first":
            return (self.n, self.cin, self.h, self.w)
        return (self.n, self.h, self.w, self.cin)

    @property
    def kind(self):
        if self.groups == 1:
            return "dense"
        if self.groups == self.cin:
            return "depthwise"
        return "grouped"

    def to_dict(self):
        return dict(dataclasses.asdict(self), kind=self.kind)


_CASES = [
    # BENCHMARKS.md's public cases (channels_last, float32).
    Case("resnet3x3", 4, 56, 56, 64, 64, 3, public=True),
    Case("resnet3x3s2", 4, 56, 56, 128, 128, 3, stride=2, public=True),
    Case("pointwise", 4, 28, 28, 256, 512, 1, padding="valid", public=True),
    Case("grouped32", 4, 28, 28, 256, 256, 3, groups=32, public=True),
    Case("grouped8", 4, 28, 28, 256, 256, 3, groups=8, public=True),
    Case("depthwise", 4, 56, 56, 128, 128, 3, groups=128, public=True),
    Case("dilated2", 4, 64, 64, 64, 64, 3, dilation=2, public=True),
    Case("dilated4", 4, 64, 64, 64, 64, 3, dilation=4, public=True),
    Case("stem7x7s2", 4, 224, 224, 3, 64, 7, stride=2, public=True),
    Case("batch1", 1, 56, 56, 64, 64, 3, public=True),
    # channels_first twins (target: within 1.3x the time of the channels_last case).
    Case("resnet3x3_cf", 4, 56, 56, 64, 64, 3, data_format="channels_first",
         note="resnet3x3 in channels_first"),
    Case("grouped32_cf", 4, 28, 28, 256, 256, 3, groups=32, data_format="channels_first",
         note="grouped32 in channels_first"),
    # Odd channel counts (not multiples of 8 or 16), batch 1, larger kernels, 1x1 stride 2.
    Case("odd61to47", 3, 30, 30, 61, 47, 3, note="odd channels, odd batch"),
    Case("grouped_odd", 4, 28, 28, 63, 63, 3, groups=7, note="9 channels per group"),
    Case("grouped4", 4, 56, 56, 128, 128, 3, groups=32,
         note="4 channels per group (ResNeXt-50 32x4d, first stage)"),
    Case("grouped16", 4, 14, 14, 512, 512, 3, groups=32,
         note="16 channels per group (ResNeXt-50 32x4d, third stage)"),
    Case("batch1_odd", 1, 29, 29, 37, 53, 3, note="batch 1, odd sizes and channels"),
    Case("k5x5", 4, 28, 28, 64, 64, 5),
    Case("k7x7", 4, 28, 28, 32, 32, 7),
    Case("dw5x5", 4, 28, 28, 240, 240, 5, groups=240, note="depthwise 5x5 (EfficientNet)"),
    Case("dw7x7", 4, 56, 56, 96, 96, 7, groups=96, note="depthwise 7x7 (ConvNeXt-T, stage 1)"),
    Case("pointwise_s2", 4, 56, 56, 128, 256, 1, stride=2, padding="valid",
         note="ResNet downsampling shortcut"),
    # Small layers: per-call overhead of each bridge against Keras.
    Case("small8x8", 8, 8, 8, 16, 16, 3, small=True),
    Case("tiny8x8", 1, 8, 8, 3, 4, 3, small=True),
]

CASES = {c.name: c for c in _CASES}

# --quick: a dense, a grouped (cheap even for Keras' slow grouped training step) and a tiny case.
QUICK = ("resnet3x3", "grouped_odd", "tiny8x8")


def select(names=None, quick=False):
    """The cases to run, in table order. `names`: iterable of names (or None for all)."""
    if names is None:
        names = QUICK if quick else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"Unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return [CASES[n] for n in names]
