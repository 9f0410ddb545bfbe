"""Evaluation: base / new / all-class accuracy, saved runs re-evaluated, transfer, prediction, prompt words.

    python eval.py --ckpt runs/dtd/coop-mao/shots16_seed1          # a run folder, as train.py evaluates it
    python eval.py --ckpt runs/dtd/coop-none/shots16_seed1/prompt.pt --subsample all
    python eval.py --ckpt runs/xd-imagenet/coop-mao/shots16_seed1 --datasets xd,dg   # Table 2, DG
    python eval.py --ckpt runs/dtd/coop-mao/shots16_seed1 --predict a.jpg --words    # one image; the prompt
    python eval.py --summarize runs/ --plot runs/   # the papers' tables and figures (report.py)

Base-to-new (CoOp protocol, MAO §4.1): base accuracy on the base test split, new on the new one, HM =
2 B N / (B + N); each class set is scored by the run's prompt for it (MAO: the base-step prompt for
base classes, the new-step prompt for new ones, as the paper's ablations and official code do).
Cross-dataset (MAO §4.2, Table 2): a prompt trained on every ImageNet class (train.py --subsample all)
on each target's full test split with its own class names; DG: on ImageNet-V2 / -Sketch / -A / -R."""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from clip_prompt import build_learner, class_logits, class_texts, load_clip
from dept import DePT
from data import (DG_TARGETS, XD_TARGETS, ImageList, ImageReadError, build_transforms, dataset_spec, fewshot_splits,
                  read_image, read_splits, subsample_classes)
from report import harmonic_mean, plot, summarize
from rundir import error_line, write_json


@torch.no_grad()
def accuracy(learner, loader, device, desc="eval"):
    """Top-1 accuracy (%) over a loader of (image, label, index); text features computed once."""
    learner.eval()
    texts = class_texts(learner)  # (C, E) once, unless the learner's texts depend on the image
    correct = total = 0
    for images, labels, _ in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        logits = class_logits(learner, images.to(device), texts)  # (B, C)
        if not logits.isfinite().all():  # a diverged prompt: its argmax would be a silent chance-level score
            raise FloatingPointError(f"{desc}: the prompt gives non-finite scores (it diverged in training): train "
                                     f"again into another --out with a smaller --lr")
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def test_loader(image_dir, items, transform, batch_size=100, workers=0, decoded=None):
    return torch.utils.data.DataLoader(ImageList(image_dir, items, transform, decoded),
                                       batch_size=batch_size, shuffle=False, num_workers=workers)


# -----------------------------------------------------------------------------
# A run's own evaluation: base classes with the prompt for base classes, new ones with the prompt for new ones

def evaluate_run(args, learner, data, loaders, states):
    """Base and new (or all-class) test accuracy and HM, and the closing line."""
    device = torch.device(args.device)

    def acc(names, state, items, desc, alone=False):  # alone: DePT's learner without its head
        model = learner.learner if alone else learner
        model.set_classnames(names)
        model.load_learned(state)
        return accuracy(model, loaders.test(items), device, desc)

    res = {"dataset": args.dataset, "backbone": args.backbone, "method": args.method, "seed": args.seed,
           "shots": args.shots, "protocol": "b2n" if args.subsample == "base" else "all",
           "stage": args.stage if args.method == "mao" else None, "recipe": args.recipe, "variant": args.variant}
    base_test, new_test = data.base["test"], data.new["test"]
    if args.subsample == "all":  # Table 2's source; targets: eval.py
        res["all"] = acc(data.base_names, states["base"], base_test, "test all")
        if "stage1" in states:
            res["all_stage1"] = acc(data.base_names, states["stage1"], base_test, "test all (P)")
        res["line"] = f"all classes {res['all']:.2f}"
        return res
    res["base"] = acc(data.base_names, states["base"], base_test, "test base")
    if args.method == "dpc":
        res["new"] = acc(data.new_names, states["new"], new_test, "test new (omega_n mix)")
        res["base_stage1"] = acc(data.base_names, states["stage1"], base_test, "test base (P)")
        res["new_stage1"] = res["new"] if args.omega_n == 0 else acc(data.new_names, states["stage1"],
                                                                     new_test, "test new (P)")
    elif args.method == "dept":  # new classes: the learner's cosine logits alone
        res["new"] = acc(data.new_names, states["new"], new_test, "test new", alone=True)
    else:
        res["new_base_prompt"] = acc(data.new_names, states["base"], new_test, "test new (base prompt)")
        if states.get("new") is not None:  # MAO's new step
            res["new"] = acc(data.new_names, states["new"], new_test, "test new")
        elif args.method == "mao":  # base step only: the paper's "base step only" row (Table 8 (c))
            res["new"] = res["new_base_prompt"]
        else:
            res["new"] = res.pop("new_base_prompt")
    res["hm"] = harmonic_mean(res["base"], res["new"])
    line = f"base {res['base']:.2f} | new {res['new']:.2f} | HM {res['hm']:.2f}"
    if "new_base_prompt" in res:
        line += f" | new with base prompt {res['new_base_prompt']:.2f}"
    if "base_stage1" in res:
        line += f" | stage 1 (P): base {res['base_stage1']:.2f} new {res['new_stage1']:.2f}"
    res["line"] = line
    return res


# -----------------------------------------------------------------------------
# Re-evaluating checkpoints

def load_checkpoint(path, device="cpu"):
    """A prompt checkpoint written by train.py; fails loudly on a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # not a torch file at all (text, truncated download, another format)
        raise ValueError(f"{path} is not a prompt checkpoint written by train.py: torch.load failed "
                         f"({type(e).__name__}). Give a run folder or its base_prompt.pt / "
                         f"new_prompt.pt / prompt.pt") from None
    if not isinstance(ckpt, dict) or not {"learned", "classnames", "args"} <= set(ckpt):
        raise ValueError(f"{path} is not a prompt checkpoint written by train.py (it needs learned, "
                         f"classnames and args)")
    return ckpt


def prompt_files(run):
    """{'base': the prompt for classes it was trained on, 'new': for classes it never saw} of
    a run folder or file. MAO: base_prompt.pt / new_prompt.pt; DPC: its omega_b / omega_n
    mixes; alone: prompt.pt."""
    if os.path.isfile(run):
        return {"base": run, "new": run}
    if not os.path.isdir(run):
        raise FileNotFoundError(f"checkpoint {run} not found")
    base = next((os.path.join(run, f) for f in ("base_prompt.pt", "prompt.pt")
                 if os.path.isfile(os.path.join(run, f))), None)
    if base is None:
        raise FileNotFoundError(f"{run} holds no base_prompt.pt or prompt.pt (not a train.py run, or "
                                f"not finished?)")
    new = os.path.join(run, "new_prompt.pt")
    return {"base": base, "new": new if os.path.isfile(new) else base}


def _setup(ckpt, overrides):
    """(CLIP, test transform, device, arguments) of a checkpoint; overrides beat its arguments."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "backbone" in overrides and overrides["backbone"] != ckpt["backbone"]:
        raise ValueError(f"checkpoint is a '{ckpt['backbone']}' prompt, not '{overrides['backbone']}'")
    a = dict(ckpt["args"], **overrides)
    device = a.get("device") or "auto"
    if device == "auto" or (device.startswith("cuda") and not torch.cuda.is_available()):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # GPU-trained prompts run here too
    full = bool(a.get("full_text"))  # a run from before --full_text: evaluated on the prompts' own positions
    model = load_clip(a["clip"], device, a.get("precision", "auto"), full_text=full)  # a bad device: refused there
    device = torch.device(device)
    return model, build_transforms(model.visual.input_resolution)[1], device, a


def load_teacher(run, classnames, device, precision="auto", base_names=None, resolution=None, full_text=False):
    """PromptKD's teacher: the PromptSRC run at `run` (its CLIP, prompt and classes), frozen, over
    classnames; refused in one line when its classes or its CLIP's input size do not fit."""
    ck = load_checkpoint(prompt_files(run)["base"])
    if ck["backbone"] != "promptsrc":
        raise ValueError(f"--teacher {run}: PromptKD's teacher is a PromptSRC run, not {ck['backbone']}")
    if base_names is not None and ck["classnames"] != list(base_names):
        raise ValueError(f"--teacher {run} was trained on other classes ({', '.join(ck['classnames'][:3])}, "
                         f"...) than these base classes ({', '.join(base_names[:3])}, ...)")
    model = load_clip(ck["args"]["clip"], device, precision, full_text=full_text)
    if resolution and model.visual.input_resolution != resolution:
        raise ValueError(f"--teacher {run}: its CLIP takes {model.visual.input_resolution} px images, the "
                         f"student's {resolution} px")
    teacher = build_learner("promptsrc", model, classnames, **ck["learner_kwargs"])
    teacher.load_learned(ck["learned"])
    return teacher.requires_grad_(False).eval()


def prompt_learner(model, ck, names, device, all_names=None):
    """The learner a prompt file describes, over names: with DePT's head when it has one (its rows for
    names), with PromptKD's teacher (over all_names)."""
    kw = dict(ck.get("learner_kwargs", {}))
    if ck["backbone"] == "promptkd":
        kw["teacher"] = load_teacher(ck["args"]["teacher"], all_names or names, device, ck["args"]["precision"],
                                     full_text=model.text_path.positions == "77")
    learner = build_learner(ck["backbone"], model, names, **kw)
    state = dict(ck["learned"])
    if any(n.startswith("head.") for n in state):  # DePT's, for the classes it trained on
        rows = [ck["classnames"].index(n) for n in names]
        state.update({n: state[n][rows] for n in ("head.head.weight", "head.head.bias")})
        learner = DePT(learner, ck["args"]["dept_weight"], ck["args"]["dept_lr_scale"]).to(device)
    learner.load_learned(state)
    return learner


def _prompt_accuracy(model, ck, names, image_dir, items, test_tf, device, a, desc, all_names=None):
    learner = prompt_learner(model, ck, names, device, all_names)
    loader = test_loader(image_dir, items, test_tf, a.get("test_batch_size", 100), a.get("workers", 0))
    return accuracy(learner, loader, device, desc=desc)


def evaluate_checkpoints(run, subsample=None, overrides=None):
    """A run folder or one prompt file on its own dataset: {'base', 'new', 'hm'} (or {'all'})."""
    files = prompt_files(run)
    ckpts = {k: load_checkpoint(f) for k, f in files.items()}
    model, test_tf, device, a = _setup(ckpts["base"], overrides)
    splits, image_dir = fewshot_splits(a["dataset"], a["root"], a["shots"], a["seed"])
    results = {}
    for which in ([subsample] if subsample else ["base", "new"]):
        ck = ckpts["new" if which == "new" else "base"]
        sub, names = subsample_classes(splits, which)
        if ck["subsample"] == which and ck["classnames"] != names:
            raise ValueError(f"class names of {files['new' if which == 'new' else 'base']} do not match "
                             f"the '{which}' classes of {a['dataset']} under {a['root']}: checkpoint "
                             f"{ck['classnames'][:3]}..., dataset {names[:3]}... (wrong --root, split "
                             f"file or dataset?)")
        results[which] = _prompt_accuracy(model, ck, names, image_dir, sub["test"], test_tf, device, a,
                                          f"test {which}", subsample_classes(splits, "all")[1])
    if "base" in results and "new" in results:
        results["hm"] = harmonic_mean(results["base"], results["new"])
    return results


def load_predictor(run, classes="all", overrides=None):
    """predict(image paths) -> per image, [(class, probability, prompt file)] over the run's base, new
    or all classes, most probable first; each class scored by the prompt its evaluation uses."""
    files = prompt_files(run)
    ckpts = {w: load_checkpoint(f) for w, f in files.items()}
    model, test_tf, device, a = _setup(ckpts["base"], overrides)
    names = {"base": ckpts["base"]["classnames"]}
    if ckpts["base"]["subsample"] != "all":  # a prompt.pt alone: new names from the split
        names["new"] = (ckpts["new"]["classnames"] if ckpts["new"]["subsample"] == "new" else
                        subsample_classes(read_splits(a["dataset"], a["root"])[0], "new")[1])
    groups = [w for w in names if classes in (w, "all")] or ["base"]  # an all-class run has one set
    learners = {w: prompt_learner(model, ckpts[w], names[w], device, sum(names.values(), [])).eval()
                for w in groups}
    with torch.no_grad():
        texts = {w: class_texts(learner) for w, learner in learners.items()}
    scored = [(n, os.path.basename(files[w])) for w in groups for n in names[w]]

    @torch.no_grad()
    def predict(paths):
        x = torch.stack([test_tf(read_image(p)) for p in paths]).to(device)
        probs = torch.cat([class_logits(learners[w], x, texts[w]) for w in groups], -1).float().softmax(-1)
        return [sorted(((n, p, f) for (n, f), p in zip(scored, row.tolist())), key=lambda t: -t[1])
                for row in probs]
    return predict


def prompt_words(run, k=3, device="cpu"):
    """{prompt file: per learned text context vector, its k nearest CLIP token embeddings as (token,
    Euclidean distance)}, as CoOp's interpret_prompt.py; a run folder's are also written to
    RUN/prompt_words.txt. Nearest tokens are often not readable words: the vectors leave the vocabulary."""
    from clip.simple_tokenizer import SimpleTokenizer
    files = [os.path.join(run, f) for f in ("prompt.pt", "parallel_prompt.pt", "base_prompt.pt",
                                            "new_prompt.pt") if os.path.isfile(os.path.join(run, f))]
    if os.path.isdir(run) and not files:
        raise ValueError(f"{run} holds no learned prompt (zero-shot CLIP learns none): --words has nothing to show")
    decoder, vocab, out = SimpleTokenizer().decoder, {}, {}
    for path in files if os.path.isdir(run) else [run]:
        ck = load_checkpoint(path)
        key, a = ("text_ctx", load_checkpoint(prompt_files(ck["args"]["teacher"])["base"])["args"]) \
            if ck["backbone"] == "promptkd" else ("ctx", ck["args"])  # PromptKD: the teacher's
        if a["clip"] not in vocab:
            vocab[a["clip"]] = load_clip(a["clip"], torch.device(device), "fp32").token_embedding.weight
        dist, idx = torch.cdist(ck["learned"][key].float().to(device), vocab[a["clip"]]).topk(k, largest=False)
        out[os.path.basename(path)] = [[(decoder[i].replace("</w>", ""), round(d, 4)) for i, d in
                                        zip(row_i.tolist(), row_d.tolist())] for row_i, row_d in zip(idx, dist)]
    if os.path.isdir(run):
        with open(os.path.join(run, "prompt_words.txt"), "w") as f:
            f.write("".join(f"{name}\n" + "".join(f"  {j + 1}: " + "  ".join(f"{w} ({d:.3f})" for w, d in row)
                                                 + "\n" for j, row in enumerate(rows)) for name, rows in out.items()))
    return out


def parse_targets(spec):
    """Comma-separated 'xd' (Table 2's 10 targets), 'dg' (the ImageNet variants), dataset names."""
    out = []
    for name in spec.split(","):
        for t in {"xd": XD_TARGETS, "dg": DG_TARGETS}.get(name.strip(), [name.strip()]):
            t = dataset_spec(t)[0]  # unknown names fail here with the list of valid ones
            if t not in out:
                out.append(t)
    return out


def evaluate_transfer(run, targets, overrides=None, redo=False):
    """Zero-shot transfer of a run's prompt to other datasets (Table 2; DG): every class of each
    target, its full test split, its own class names in the prompt. Targets whose classes the prompt
    was trained on (the ImageNet variants of an ImageNet run) use the base prompt, others the prompt
    for unseen classes (DPC's omega_n mix). Each result is merged into RUN/transfer.json as soon as
    it exists, so an interrupted evaluation resumes."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run} is not a run folder (transfer results are written into it)")
    files = prompt_files(run)
    ckpts = {k: load_checkpoint(f) for k, f in files.items()}
    path = os.path.join(run, "transfer.json")
    done = {"accuracy": {}, "prompt": {}, "classes": {}, "test_images": {}}
    if os.path.isfile(path) and not redo:
        with open(path) as f:
            done.update(json.load(f))
    todo = [t for t in targets if t not in done["accuracy"]]
    if not todo:
        return done
    root = (overrides or {}).get("root") or ckpts["base"]["args"]["root"]
    data = {t: read_splits(t, root) for t in todo}  # every target folder checked before CLIP loads
    model, test_tf, device, a = _setup(ckpts["base"], overrides)
    trained = set(ckpts["base"]["classnames"])
    for t in todo:
        (splits, image_dir) = data[t]
        sub, names = subsample_classes(splits, "all")
        which = "base" if set(names) <= trained else "new"
        acc = _prompt_accuracy(model, ckpts[which], names, image_dir, sub["test"], test_tf, device, a,
                               f"test {t}")
        done["accuracy"][t], done["prompt"][t] = acc, os.path.basename(files[which])
        done["classes"][t], done["test_images"][t] = len(names), len(sub["test"])
        write_json(done, path)
        print(f"{t}: {acc:.2f} ({len(names)} classes, {len(sub['test'])} test images, "
              f"{done['prompt'][t]})")
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="a run folder written by train.py, or one prompt .pt file")
    ap.add_argument("--subsample", choices=["base", "new", "all"], help="evaluate one class split only")
    ap.add_argument("--datasets", help="transfer targets of --ckpt: names, xd (Table 2), dg (ImageNet-V2/S/A/R)")
    ap.add_argument("--predict", nargs="+", metavar="IMG", help="top-5 classes of these images by --ckpt")
    ap.add_argument("--classes", default="all", choices=["base", "new", "all"], help="classes --predict ranks")
    ap.add_argument("--words", action="store_true", help="nearest CLIP tokens of --ckpt's context vectors")
    ap.add_argument("--redo", action="store_true", help="re-evaluate targets already in transfer.json")
    ap.add_argument("--summarize", metavar="DIR", help="tabulate every results.json under DIR")
    ap.add_argument("--plot", metavar="DIR", help="draw Fig. 3 and Fig. 4 style PNGs from the runs under DIR")
    ap.add_argument("--seeds", help="seeds every setting should have, e.g. 1,2,3 (default: those found)")
    ap.add_argument("--root", help="dataset root (default: the one the checkpoint was trained with)")
    ap.add_argument("--clip", help="CLIP name or checkpoint path (default: the training one)")
    ap.add_argument("--backbone", help="expected backbone; a checkpoint of another backbone is refused")
    ap.add_argument("--device", help="auto, cpu or cuda")
    ap.add_argument("--workers", type=int, help="DataLoader workers")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    if a.summarize or a.plot:
        out = None
        if a.summarize:
            out = summarize(a.summarize, seeds)
            print(out["markdown"])
            print(f"\nwrote summary.md, table1/table2 .csv under {a.summarize}")
        if a.plot:
            for p in plot(a.plot, seeds) or []:
                print(f"wrote {p}")
        return out
    if not a.ckpt:
        ap.error("give --ckpt, --summarize or --plot")
    overrides = dict(root=a.root, clip=a.clip, backbone=a.backbone, device=a.device, workers=a.workers)
    if a.words:
        for name, rows in prompt_words(a.ckpt).items():
            print(name, *(f"  {j + 1}: " + "  ".join(w for w, _ in row) for j, row in enumerate(rows)), sep="\n")
    if a.predict:
        predict = load_predictor(a.ckpt, a.classes, overrides)
        for path in a.predict:  # one image at a time: an unreadable one is reported, the others still scored
            try:
                print(path, *(f"  {p:6.1%}  {n}  ({f})" for n, p, f in predict([path])[0][:5]), sep="\n")
            except ImageReadError as e:
                print(f"{path}: {e}")
    if a.words or a.predict:
        return None
    if a.datasets:
        return evaluate_transfer(a.ckpt, parse_targets(a.datasets), overrides, a.redo)
    r = evaluate_checkpoints(a.ckpt, a.subsample, overrides)
    print(" | ".join(f"{k} {v:.2f}" if k != "hm" else f"HM {v:.2f}" for k, v in r.items()))
    return r


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror
                 else f"error: {error_line(e)}")
