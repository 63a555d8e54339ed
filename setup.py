"""jdjax: JAX/Flax reimplementations of ten JD.com research methods."""

from setuptools import find_packages, setup

# One torch constraint for every extra, exact so that pip never resolves a newer multi-GB build. The
# parity tests need open_clip (CLIP's ResNet towers), which imports torchvision; PyPI's torchvision
# does not import beside torch 2.13.0 ("operator torchvision::nms does not exist"), so torch and
# torchvision are pinned as a pair that imports together with open_clip and transformers' models.
# Conversion works with torch >= 2.3 if another build is already installed.
TORCH = "torch==2.14.1"
TORCHVISION = "torchvision==0.29.1"
OPEN_CLIP = "open_clip_torch==3.3.0"
TRANSFORMERS = "transformers>=4.44"

setup(
    name="jdjax",
    version="0.1.0",
    description="JAX/Flax reimplementations of JD.com research methods (token merging, CTR, bandits, ads).",
    packages=find_packages(include=["jdjax", "jdjax.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "etils[epath]>=1.7",  # workdir I/O: local paths and gs:// alike
        "chex>=0.1.89",
        "einops>=0.8",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26,<3",
        "grain>=0.2.12,<0.3",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "scikit-learn>=1.4",  # embedded data: the bundled handwritten digits and sample photos
        "matplotlib>=3.8",  # plots written into the workdir
        "regex>=2023.0",  # the CLIP tokenizer's Unicode classes
        "Pillow>=10",  # image resizing (TFDS reader) and the merging visualisation
        "pyarrow>=14",  # Parquet multi-scene click logs (data/clicklog.py)
        "safetensors>=0.4",  # .safetensors checkpoints in the converters
        "av>=12",  # PyAV: decoding the text-video retrieval videos (data/video.py)
        "sentencepiece>=0.2",  # subword vocabularies for the text methods (data/text.py)
        "jieba>=0.42",  # Chinese word segmentation (data/text.py)
        "bm25s>=0.2",  # BM25 retrieval of similar dialogue contexts (data/dialogue.py)
        # embedded data: the English chatterbot conversations (data/dialogue.py); 1.2 pins PyYAML < 4
        "chatterbot-corpus>=1.3",
        "PyYAML>=6",  # reading the chatterbot YAML files (data/dialogue.py)
        "sacrebleu>=2.4",  # corpus BLEU of generated text (metrics/text.py)
        "rouge-score>=0.1.2",  # ROUGE-L of generated product descriptions (metrics/generation.py)
    ],
    extras_require={
        # The test extra installs what the reader and parity tests need, so CI runs them all.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "scipy>=1.11",  # reference distributions and optimisers in the tests
            "portpicker>=1.6",  # free ports for the multi-process tests
            "fsspec>=2023.1",  # an in-memory gs:// filesystem for the workdir I/O tests
            "tensorflow-datasets>=4.9.7",
            # OpenAI's bpe_simple_vocab_16e6.txt.gz and reference tokenizer (needs only ftfy, regex).
            "openai-clip==1.0.1",
            OPEN_CLIP,  # the reference ModifiedResNet / CLIP of the RN50 parity tests
            TORCH,
            TORCHVISION,
            TRANSFORMERS,
        ],
        "tfds": ["tensorflow-datasets>=4.9.7"],
        "convert": [TORCH, TRANSFORMERS],
        "gcs": ["etils[epath-gcs]"],  # gs:// workdirs without TensorFlow (gcsfs, google-cloud-storage)
    },
)
