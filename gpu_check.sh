#!/usr/bin/env bash
# The GPU check of docs/cost.md, for a bare GPU machine with PyTorch and no network, in at most 8 minutes:
#   bash gpu_bundle.sh                 # here, with the network: gpu_bundle/ (3.4 MB), carried with the working tree
#   bash gpu_check.sh OUT              # there: logs, bench JSON / markdown and the attention timings under OUT
# 1. the demo (CoOp + MAO) on CUDA in fp16 with loss scaling, on both of train.py's text paths (the shared prefix, the
#    default; --full_text 1)
# 2. bench.py at ViT-B/16 shapes on CUDA, the three text paths side by side (shared prefix, prompts' own length, 77):
#    CoOp and PromptSRC at 500 classes, CoCoOp on DTD's 24 at batch 4; peak memory is torch.cuda.max_memory_allocated,
#    to set against docs/cost.md's what-fits table
# 3. the text tower's attention kernels: CLIP's cut causal mask against is_causal per SDPA backend, and the shared
#    prefix's attention (a float mask over prefix + row keys)
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-gpu_check_out}
mkdir -p "$out"
if [ -d gpu_bundle ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu_bundle/*.whl || exit 1
    export PYTHONPATH=/tmp/site MINILM_CACHE=gpu_bundle/minilm_demo.pt
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the same steps here (slow)
if [ "$DEVICE" != cpu ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch here; run it on the GPU machine (DEVICE=cpu: the same steps on the CPU)"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
for full in 0 1; do  # the demo's data is written by the first run (data/demo)
    t0=$SECONDS
    timeout 100 python3 train.py --dataset demo --device $DEVICE --precision fp16 --full_text $full \
        --out "$out/demo_full$full" 2>&1 | grep -v "^\[" | tail -3
    echo "demo --full_text $full: $((SECONDS - t0)) s"
done  # worst case, every step at its timeout: 100 + 100 + 90 + 90 + 60 + 45 s = 8.1 minutes
bench() { timeout "$1" python3 bench.py --device $DEVICE --repeats 3 "${@:3}" --out "$out/$2.json" 2>&1 | tail -1; }
bench 90 coop500 --backbone coop --classes 500 --lines mao_base,mao_new,dpc
bench 90 promptsrc500 --backbone promptsrc --classes 500 --lines mao_base,target
bench 60 cocoop24 --backbone cocoop --dataset dtd --batch 4 --lines mao_base,mao_new
timeout 45 python3 - <<'EOF' 2>&1 | tee "$out/attention.txt"
import contextlib, os, time, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from clip.model import CLIP, convert_weights
import clip_prompt
# ViT-B/16's text tower, fp16, 500 classes at a DTD-length prompt (11 positions), forward and backward
dev = os.environ["DEVICE"]
m = clip_prompt.frozen_clip(CLIP(512, 224, 1, 768, 16, 77, 49408, 512, 8, 12).to(dev), "prompt")
convert_weights(m)  # CLIP's own fp16 layout, as clip.load gives on a GPU (LayerNorms stay fp32)
x = torch.randn(500, 11, 512, device=dev, dtype=torch.half)
x[:, :5] = x[:1, :5]  # [SOS] and a 4-vector context, shared by every row
x.requires_grad_()
eot = torch.full((500,), 10, device=dev)
def masked(block, h):  # CLIP's own mask, cut: no is_causal hint
    y = block.ln_1(h)
    h = h + block.attn(y, y, y, need_weights=False, attn_mask=block.attn_mask[:len(h), :len(h)].to(h.dtype))[0]
    return h + block.mlp(block.ln_2(h))
def timed(fn):
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if dev.startswith("cuda") else lambda: None
    sync(); t = time.perf_counter()
    for _ in range(20):
        fn()
    sync(); return (time.perf_counter() - t) / 20 * 1e3
step = lambda: clip_prompt.encode_token_embeddings(m, x, eot).float().sum().backward()
causal = clip_prompt.causal_block
for name, backends in [("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
                       ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("math", [SDPBackend.MATH])]:
    for mode, block, path in (("is_causal", causal, "prompt"), ("mask", masked, "prompt"), ("prefix", causal, "prefix")):
        clip_prompt.causal_block, m.text_path = block, clip_prompt.TextPath(path, False)
        try:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                print(f"{name:9} {mode:9} {timed(step):7.2f} ms per forward + backward")
        except RuntimeError as e:
            print(f"{name:9} {mode:9} not available ({str(e).splitlines()[0][:80]})")
EOF
ls "$out"
