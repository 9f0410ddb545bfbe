"""The run folder: what a run leaves on disk, and how it is kept safe.

One folder holds one run (OutputLock): a second run into it is refused, two processes never write it at once,
and --resume continues it only with the settings it was trained with (settings()). Every file is written whole
(write_whole: a crash or a full disk never leaves a truncated checkpoint or results.json). log.txt holds every
line printed; a failure ends in one line naming the file and the fix (failure_line). This file imports nothing
from the project: every other file may use it."""
import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import pathlib
import resource
import shlex
import time
from contextlib import contextmanager

import torch
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Files written whole

def write_whole(path, dump):
    """dump(tmp) writes a temporary file, renamed over path once complete and removed if writing fails:
    a crash or a full disk never leaves a truncated file under path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        dump(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: the error names the file it was writing
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path):
    write_whole(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=1)))


def save_atomic(obj, path):
    """torch.save, whole or not at all; a failure as an OSError that names path."""
    try:
        write_whole(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # a full disk surfaces as RuntimeError from torch's writer
        raise OSError(getattr(e, "errno", None) or errno.EIO, f"writing failed ({str(e).splitlines()[0]})",
                      path) from None


# -----------------------------------------------------------------------------
# One run per folder, and what a resume must match

# Flags a resumed run may change: where things are and how fast they run, never what is learned
SYSTEM = {"root", "init_from", "device", "workers", "test_batch_size", "out", "resume", "log_every",
          "cache_gb", "stage", "variant", "download", "recompute_text"}


NEW_STEP = {"new_shots", "new_batch_size", "pseudo_labeler", "pseudo_label_every"}  # MAO's new step's own


LEGACY = {"full_text": 1}  # a setting older runs lack, and the value they ran with (77 positions before the flag)


def settings(args):
    """What shapes training: a resumed run must have the same. CLIP is named by its weights (the file's name and
    SHA-256), not by where they lie: a run folder moved to another checkout or machine resumes."""
    return {k: weights_id(v) if k == "clip" else v for k, v in vars(args).items() if k not in SYSTEM}


@functools.lru_cache
def weights_id(clip):
    """'NAME sha256:HEX' for a CLIP file, the model name as given otherwise."""
    if not os.path.isfile(clip):
        return clip
    return f"{os.path.basename(clip)} sha256:{hashlib.sha256(pathlib.Path(clip).read_bytes()).hexdigest()[:16]}"


def differences(old, new, skip=()):
    """'--flag old (now new)' for each setting a run on disk (old: its checkpoint's settings or args.json) has
    other than now. An old path to CLIP is read as its weights where it still exists, else by its file name."""
    out = []
    for k in sorted((set(old) | set(new)) - set(skip)):
        was, now = old.get(k, LEGACY.get(k, "(not recorded)")), new.get(k)
        if k == "clip" and " sha256:" not in str(was):  # recorded as a path (before weights_id)
            same_name = os.path.basename(was) == now.rsplit(" sha256:")[0]
            was = weights_id(was) if os.path.isfile(was) else now if same_name else was
        if was != now:
            out.append(f"--{k} {was} (now {now})")
    return out


def load_last(path, device):
    """An epoch checkpoint (*_last.pt); one that does not read names itself and the way on."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or overwritten by hand: torch's reader fails in many ways
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}): delete it and resume "
                         f"again, which trains that stage from its first epoch (the others keep theirs)") from None


class OutputLock:
    """Holds --out for one run: a lock the kernel drops with its process (a killed run never blocks
    --resume), and no second run into a folder that holds one: one folder, one run, never two mixed."""

    def __init__(self, args):
        self.args, self.file = args, None

    def __enter__(self):
        a = self.args
        if a.resume and not glob.glob(os.path.join(a.out, "*_last.pt")) and not os.path.isfile(
                os.path.join(a.out, "results.json")):
            print(f"--resume: {a.out} holds no run to continue (a mistyped --out?); a new one starts there")
        return self.claim()

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # also when the run fails: an in-process caller may go on

    def claim(self):
        args = self.args
        if self.file is not None or not os.path.isdir(args.out):
            return self
        self.file = open(os.path.join(args.out, ".lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid, self.file = self.file.read().strip(), self.file.close()
            raise ValueError(f"--out {args.out} is in use by a running train.py (pid {pid}): wait for it "
                             f"to end, or choose another --out") from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        self.check_folder()
        return self

    def check_folder(self):
        args = self.args
        ckpts = sorted(glob.glob(os.path.join(args.out, "*_last.pt")))
        finished = os.path.isfile(os.path.join(args.out, "results.json"))
        before = {}  # the arguments of the run the folder holds
        if os.path.isfile(os.path.join(args.out, "args.json")):
            with open(os.path.join(args.out, "args.json")) as f:
                before = json.load(f)
        if args.resume:
            for path in ckpts:
                differ = differences(load_last(path, "cpu").get("settings", {}), settings(args))
                if differ:
                    raise ValueError(f"--resume: {path} was trained with other settings: {', '.join(differ)}. "
                                     f"Resume with its flags (args.json there), or train into another --out")
            was = before.get("stage", args.stage)
            if finished and (was == args.stage or args.method != "mao"):
                print(f"{args.out} holds a finished run: its stages are complete, so only evaluation runs again")
            elif finished:  # e.g. a --stage base run continued: its new step trains now
                print(f"{args.out} holds a finished --stage {was} run: it goes on as --stage {args.stage} (a step "
                      f"not trained yet trains now) and its results.json is replaced by this run's")
        elif args.stage == "new" and (before.get("method"), before.get("stage")) == ("mao", "base"):
            # --stage new continues a MAO --stage base run in the same folder, and only with its settings: else
            # results.json would claim settings its base prompt never had. The new step's own may differ.
            differ = differences(before, json.loads(json.dumps(settings(args))), SYSTEM | NEW_STEP)
            if differ:
                raise ValueError(f"--stage new: {args.out} holds a base step trained with other settings: "
                                 f"{', '.join(differ)}. Run it with that step's flags (args.json there), or train "
                                 f"both steps into another --out")
        elif finished or ckpts or before:
            what = "a finished run (results.json)" if finished else "a partial run"
            raise ValueError(f"--out {args.out} holds {what}: add --resume to "
                             f"{'re-evaluate' if finished else 'continue'} it, or choose another --out")


# -----------------------------------------------------------------------------
# The log, the results, the one-line failure

def start_output(args, lock, notes):
    """The output folder, log.txt and args.json: written only once every check has passed; notes: the
    lines that describe the run, logged after its arguments."""
    os.makedirs(args.out, exist_ok=True)
    lock.claim()
    for tmp in glob.glob(os.path.join(args.out, "*.tmp*")):  # what an interrupted write left behind
        os.remove(tmp)
    log = make_log(os.path.join(args.out, "log.txt"))
    log(" ".join(f"{k}={v}" for k, v in vars(args).items()))
    write_json(vars(args), os.path.join(args.out, "args.json"))
    for line in notes:
        log(line)
    return log


def make_log(path):
    """log(msg): printed above the progress bar and appended to path (log.txt); log.scalars(tag, step, {name:
    value}): TensorBoard scalars beside it, as Dassl's runs write them (tensorboard --logdir runs/ shows a sweep),
    written in this thread: a full disk fails here, naming the file, not in a writer thread or at exit."""
    events = None

    def named(fn, where):  # an OSError that names the file it was writing
        try:
            return fn()
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), where) from None

    def log(msg):
        tqdm.write(msg)

        def append():
            with open(path, "a") as f:
                f.write(msg + "\n")
        named(append, path)

    def scalars(tag, step, values):
        nonlocal events
        prefix = os.path.join(os.path.dirname(path) or ".", "events")
        events = events or named(lambda: EventsWriter(prefix), prefix + ".out.tfevents")
        for name, value in values.items():
            events.write_event(Event(wall_time=time.time(), step=step, summary=scalar(f"{tag}/{name}", value)))
        named(events.flush, events._file_name)
    log.scalars, log.close = scalars, lambda: events and named(events.close, events._file_name)
    return log


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak RSS (KB on Linux)


def finish(args, res, log):
    """Print the line, then write results.json whole (its presence marks the run finished)."""
    line, path = res.pop("line"), os.path.join(args.out, "results.json")
    log(line)  # printed first: a full disk below still leaves the accuracies on the screen
    log.scalars("results", 0, {k: res[k] for k in ("base", "new", "hm", "all") if k in res})
    log.close()
    write_json(res, path)
    log(f"wrote {path}")
    return res


class Meter:
    """What each phase of a run costs: frozen-CLIP encodings (EncodeCounter), seconds, and the
    seconds its training loop waited for the data loader: results.json's "cost"."""

    def __init__(self, counter):
        self.counter, self.cost, self.resumed = counter, {}, 0.0

    @contextmanager
    def phase(self, name):
        before, t0, extra = dict(self.counter.counts), time.time(), {"counts": self.counter.counts}
        yield extra  # the phase may add its own figures (the loader's share), and read the live counts
        extra.pop("counts", None)  # train_stage takes it
        resumed = extra.pop("resumed_seconds", 0.0)  # spent by the process a --resume continues
        earlier = extra.pop("resumed_encodings", {})  # encoded by it, in the epochs it completed
        counts = {k: v - before[k] + earlier.get(k, 0) for k, v in self.counter.counts.items()}
        self.resumed += resumed
        self.cost[name] = dict(counts, seconds=time.time() - t0 + resumed, **extra)


def error_line(e):
    """The one line to show for an error. One raised in a DataLoader worker arrives wrapped in the
    worker's traceback text; its last line is the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg


def failure_line(e, argv):
    """The one line a failure ends in: what happened, to which file, and how to go on."""
    again = f"python train.py {shlex.join(a for a in argv if a != '--resume')} --resume"
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted; continue with: {again}"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return (f"error: {e.filename}: {e.strerror}. Free space or make it writable (else start again with "
                f"another --out); then {again} continues from the last complete checkpoint (a run whose "
                f"training is done is evaluated again, without retraining)")
    return f"error: {error_line(e)}"
