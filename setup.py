from setuptools import setup

# The top-level folders kernels/, adapters/ and bench/ install inside freecure_ops (package_dir below). PyPI has
# packages of those names (Hugging Face's "kernels", which transformers imports; AdapterHub's "adapters"), so the
# folders carry no __init__.py and never shadow them, not even from the checkout root; each folder's package
# module is its _package.py, found by freecure_ops/subpackages.py.
setup(
    name="freecure-ops",
    version="0.1.0",
    description="Fused Triton FASA attention (FreeCure) with diffusers adapters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["freecure_ops", "freecure_ops.kernels", "freecure_ops.adapters", "freecure_ops.pipeline",
              "freecure_ops.cli", "freecure_ops.bench", "freecure_ops.demo"],
    package_dir={
        "freecure_ops": "freecure_ops",
        "freecure_ops.kernels": "kernels",
        "freecure_ops.adapters": "adapters",
        "freecure_ops.bench": "bench",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "einops",
    ],
    entry_points={"console_scripts": ["freecure = freecure_ops.cli:main"]},
    extras_require={
        # 0.42 is the version the tests run on (SD/SDXL need nothing FLUX-specific, see
        # tests/test_lazy_flux_import.py, but older releases are not tested). huggingface_hub (a diffusers and
        # transformers dependency) is used directly by freecure_ops.hub: Hub ids, revisions, offline mode; no
        # bound of its own: the tests run on 2.4 (diffusers 0.42 itself needs >= 1.32)
        "diffusers": ["diffusers>=0.42", "huggingface_hub", "Pillow"],
        # the SegFormer face parser (e.g. jonathandinu/face-parsing)
        "segformer": ["transformers>=4.40", "huggingface_hub"],
        "bench": ["matplotlib"],
        # freecure batch: Accelerate's process state shards jobs over processes/GPUs (accelerate launch, torchrun)
        "batch": ["accelerate>=0.26", "diffusers>=0.42", "huggingface_hub", "Pillow", "tqdm"],
        # freecure eval: transformers' CLIP for PC, onnxruntime for ONNX face-recognition models (IF), the plot
        "eval": ["transformers>=4.40", "huggingface_hub", "onnxruntime>=1.16", "Pillow", "matplotlib"],
        # freecure demo: the local web page; 6.31 is the version its browser test runs on (the page uses the 6.x
        # API: theme at launch(), gr.skip, trigger_mode, concurrency_id)
        "demo": ["gradio>=6.31", "diffusers>=0.42", "huggingface_hub", "Pillow"],
        # peft: the LoRA interplay tests; onnx: the tests write a tiny face model; setuptools: the packaging tests
        # build a wheel and an sdist offline (>= 70.1 builds wheels without the "wheel" package); selenium: the demo
        # page's browser test drives Debian's chromium through it (4.x: Service, WebDriverWait); pytest-xdist: the
        # suite runs on every core (-n auto: 774 s -> 444 s on a 2-core CI-sized machine)
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "diffusers>=0.42", "transformers>=4.40",
                 "huggingface_hub", "sentencepiece", "setuptools>=70.1",
                 "matplotlib", "peft", "accelerate>=0.26", "onnxruntime>=1.16", "onnx>=1.14", "selenium>=4"],
    },
)
