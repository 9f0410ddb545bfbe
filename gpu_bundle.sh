#!/usr/bin/env bash
# Builds gpu_bundle/ (not in git): what a bare GPU machine with PyTorch lacks to run gpu_check.sh, with no network.
#   bash gpu_bundle.sh [PYTHON_VERSION]     # 3.12 by default; then carry gpu_bundle/ beside the working tree
# Wheels: openai-clip (built here from its sdist), ftfy, wcwidth, tensorboardX, setuptools < 81 (openai-clip imports
# pkg_resources). MiniLM (90 MB, over the 64 MiB a bundle may hold) stays behind: minilm_demo.pt holds its unit
# embeddings of the demo's class names, which sampler.class_neighbours reads through $MINILM_CACHE.
# The machine is expected to have torch, torchvision, numpy, Pillow, tqdm, regex, protobuf and matplotlib.
set -euo pipefail
cd "$(dirname "$0")"
py=${1:-3.12}
rm -rf gpu_bundle && mkdir gpu_bundle
python -m pip wheel -q --no-deps -w gpu_bundle openai-clip==1.0.1
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d gpu_bundle \
    ftfy==6.3.1 wcwidth==0.9.5 tensorboardX==2.6.5 "setuptools<81"
HF_HUB_OFFLINE=1 python - <<'EOF'
import torch
from demo import DEMO_CLASSES
from sampler import load_minilm
names = [f"{c} {s}" for c, s in DEMO_CLASSES]  # the demo's class names (no '_': raw and spaced banks alike)
emb = load_minilm().encode(names, convert_to_tensor=True, normalize_embeddings=True).float().cpu()
torch.save(dict(zip(names, emb)), "gpu_bundle/minilm_demo.pt")
EOF
du -sh gpu_bundle && ls gpu_bundle
