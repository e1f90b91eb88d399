#!/usr/bin/env python3
"""Training over several processes (docs/distributed.md), run by mpirun with 2 ranks on however
many cores there are: each check compares a 2-rank run with a 1-process run of the same global
batch, or two 2-rank runs with each other, through their checkpoints and metrics.

    tests/mpi_training.py BUILD_DIR      (the meson suite 'mpi'; skips, exit 77, without mpirun)

Tolerances: after 8 SGD steps (16 for the resume) the parameters of 1 and 2 ranks differ by
float summation order only (gradients added in another order, expert weight gradients in other
blocks): at most 1e-5 absolute, train losses within 1e-5. Two 2-rank runs: bit-identical.
"""
import json, os, shutil, signal, struct, subprocess, sys, tempfile, time, array

build = os.path.abspath(sys.argv[1])
train, evalp = os.path.join(build, "apps", "train"), os.path.join(build, "apps", "eval")
mpirun = shutil.which("mpirun")
if mpirun is None:
    print("SKIP: mpirun not found (scripts/setup installs openmpi-bin)")
    sys.exit(77)
if "libmpi" not in subprocess.run(["ldd", train], capture_output=True, text=True).stdout:
    print("SKIP: this build has no MPI (-Dmpi=disabled, or libopenmpi-dev was missing)")
    sys.exit(77)
# As root in a container, and 2 ranks on fewer cores than that: both need a flag.
MPI = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
work = tempfile.mkdtemp(prefix="moevit_mpi_")
env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
failures = []
# SGD, not AdamW: AdamW's first steps move every weight by about lr * sign(gradient), so a
# gradient within float noise of 0 can move either way and turn 1e-7 into 1e-3. Plain momentum
# SGD keeps a difference of summation order the size it is.
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch", "32", "--limit-train", "256",
        "--limit-test", "64", "--threads", "1", "--optimizer", "sgd", "--lr", "0.05"]


def run(args, ranks=0, timeout=180):
    """ranks 0: one process without mpirun."""
    cmd = (MPI + ["-np", str(ranks)] if ranks else []) + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=work)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return "hang", "", ""


def load(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a = array.array("f" if t["dtype"] == "F32" else "q")
        a.frombytes(data[t["data_offsets"][0]:t["data_offsets"][1]])
        out[name] = a
    return out


def losses(run_dir):
    return [json.loads(l)["train_loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def train_run(name, flags, ranks=0):
    out = os.path.join(work, name)
    rc, _, err = run([train] + flags + ["--out", out], ranks)
    if rc != 0:
        failures.append(f"{name}: rc {rc}: {err[-600:]}")
        return None
    return out


def compare(what, a, b, tol):
    if a is None or b is None:
        return
    pa, pb = load(os.path.join(a, "checkpoint.safetensors")), load(os.path.join(b, "checkpoint.safetensors"))
    if pa.keys() != pb.keys():
        failures.append(f"{what}: the checkpoints hold different tensors")
        return
    worst, where = 0.0, ""
    for k in pa:
        d = max((abs(x - y) for x, y in zip(pa[k], pb[k])), default=0.0)
        if d > worst:
            worst, where = d, k
    la, lb = losses(a), losses(b)
    dl = max(abs(x - y) for x, y in zip(la, lb))
    print(f"{what}: largest parameter difference {worst:.3g} ({where}), train losses {la} / {lb}")
    if worst > tol or dl > (1e-5 if tol > 0 else 0):
        failures.append(f"{what}: parameters differ by {worst} at {where} (tolerance {tol}), "
                        f"losses by {dl}")


# --- data parallel: 2 ranks = 1 process with the same global batch ---------------------------
for model in ["vmoe-tiny", "vit-tiny"]:
    one = train_run(f"{model}-1", ["--model", model] + TINY)
    two = train_run(f"{model}-2", ["--model", model] + TINY, ranks=2)
    compare(f"data parallel {model}: 2 ranks vs 1", one, two, 1e-5)
# PRC: its cross-correlation is summed over the ranks before the loss, so 2 ranks train as one
# process does. The routing noise is drawn for the ranks' two-view batches (view 1 then view 2
# of each rank's images), whose rows interleave in one process's batch: the test turns it off.
prc = ["--model", "vmoe-tiny", "--prc", "--noise-std", "0"] + TINY
prc_one = train_run("prc-1", prc)
compare("data parallel vmoe-tiny with PRC: 2 ranks vs 1", prc_one, train_run("prc-2", prc, ranks=2), 1e-5)
compare("expert parallel vmoe-tiny with PRC: 2 ranks x 4 experts vs 1 x 8", prc_one,
        train_run("prc-ep2", prc + ["--expert-parallel", "2"], ranks=2), 1e-5)
again = train_run("vmoe-tiny-2-again", ["--model", "vmoe-tiny"] + TINY, ranks=2)
compare("data parallel: two 2-rank runs", os.path.join(work, "vmoe-tiny-2"), again, 0.0)

# --- expert parallel: 2 ranks with 4 experts each = 1 process with 8 -------------------------
for model in ["vmoe-tiny", "ec-tiny", "cosine-tiny", "pcosine-tiny", "mcentroid-tiny", "vote-tiny"]:
    one = os.path.join(work, "vmoe-tiny-1") if model == "vmoe-tiny" else \
        train_run(f"{model}-1", ["--model", model] + TINY)
    ep = train_run(f"{model}-ep2", ["--model", model, "--expert-parallel", "2"] + TINY, ranks=2)
    compare(f"expert parallel {model}: 2 ranks x 4 experts vs 1 x 8", one, ep, 1e-5)

# 4 ranks in 2 expert groups of 2 (each group splits the experts; each expert has a copy in each
# group, whose gradients are averaged) = 1 process.
compare("expert groups: 4 ranks, 2 groups of 2 x 4 experts, vs 1 x 8", os.path.join(work, "vmoe-tiny-1"),
        train_run("vmoe-tiny-4-ep2", ["--model", "vmoe-tiny", "--expert-parallel", "2"] + TINY, ranks=4), 1e-5)

# The checkpoint of an expert-parallel run holds every expert: a single-process eval reads it
# and finds the test accuracy the run logged.
ep = os.path.join(work, "vmoe-tiny-ep2")
rc, out, err = run([evalp, ep, "--limit", "64"])
logged = json.loads(open(os.path.join(ep, "metrics.jsonl")).readline())["test_accuracy"]
if rc != 0 or f"{100 * logged:.2f}%" not in out:
    failures.append(f"eval of the expert-parallel checkpoint: rc {rc}, expected accuracy "
                    f"{100 * logged:.2f}% in: {out[-300:]} {err[-300:]}")

# Resume on another rank count: 2 epochs on 2 ranks (experts split) stopped after the first,
# finished by 1 process, against 2 epochs in 1 process.
two_epochs = TINY + ["--epochs", "2"]  # the last --epochs counts
whole = train_run("resume-whole", ["--model", "vmoe-tiny"] + two_epochs)
half = train_run("resume-half", ["--model", "vmoe-tiny", "--expert-parallel", "2", "--stop-after", "1"]
                 + two_epochs, ranks=2)
if half:
    rc, _, err = run([train, "--resume", half, "--threads", "1"])
    if rc != 0:
        failures.append(f"resume of a 2-rank run by 1 process: rc {rc}: {err[-400:]}")
    else:
        compare("2 ranks then 1 (resume) vs 1 throughout", whole, half, 1e-5)


# --- bad input: a clear error from the rank that sees it, a non-zero exit, never a hang -------
def expect_error(what, args, ranks, message, timeout=60):
    rc, out, err = run(args, ranks, timeout)
    ok = isinstance(rc, int) and rc != 0 and message in (err + out)
    print(f"{what}: rc {rc}{'' if ok else ' (wrong)'}")
    if not ok:
        failures.append(f"{what}: rc {rc}, expected a non-zero exit and {message!r} in: {err[-500:]}")


bad = os.path.join(work, "bad")
expect_error("batch not divisible", [train, "--model", "vmoe-tiny"] + TINY + ["--batch", "33", "--out", bad],
             2, "does not split evenly over the 2 ranks")
expect_error("experts not divisible", [train, "--model", "vmoe-tiny", "--experts", "6",
             "--expert-parallel", "4"] + TINY + ["--out", bad], 4, "do not split evenly over 4 ranks")
expect_error("expert-parallel without mpirun", [train, "--model", "vmoe-tiny", "--expert-parallel", "2"]
             + TINY + ["--out", bad], 0, "start the run with mpirun -np N")
expect_error("expert groups that do not divide the ranks", [train, "--model", "vmoe-tiny",
             "--expert-parallel", "3"] + TINY + ["--out", bad], 4, "do not divide the 4 ranks")
expect_error("Soft MoE split", [train, "--model", "soft-tiny", "--expert-parallel", "2"] + TINY +
             ["--out", bad], 2, "Soft MoE")
# Without a GPU, --device cuda on several ranks ends on every rank with an error, whether the
# build has NCCL (no GPU visible) or not (NCCL missing).
expect_error("GPU on several ranks", [train, "--model", "vit-tiny", "--device", "cuda"] + TINY +
             ["--out", bad], 2, "cuda")
expect_error("PRC's reference diagonal on 2 ranks", [train, "--model", "vmoe-tiny", "--prc",
             "--prc-reference-diagonal"] + TINY + ["--out", bad], 2, "--prc-reference-diagonal")
expect_error("group per batch", [train, "--model", "vmoe-tiny", "--group", "batch"] + TINY +
             ["--out", bad], 2, "one group per rank")
# Ranks given different flags (mpirun's MPMD form: one command per rank).
cmd = [train, "--model", "vmoe-tiny"] + TINY + ["--out", bad]
try:
    p = subprocess.run(MPI + ["-np", "1"] + cmd + [":", "-np", "1"] + cmd[:-2] + ["--lr", "0.01", "--out", bad],
                       capture_output=True, text=True, timeout=60, env=env, cwd=work)
    rc, err = p.returncode, p.stderr + p.stdout
except subprocess.TimeoutExpired:
    rc, err = "hang", ""
print(f"mismatched flags: rc {rc}")
if not (isinstance(rc, int) and rc != 0 and "other flags than rank 0" in err):
    failures.append(f"mismatched flags: rc {rc}, expected an error naming the ranks: {err[-500:]}")

# A rank killed in the middle of a run: the other must not wait for it forever.
long_run = [train, "--model", "vmoe-tiny", "--dataset", "synthetic", "--epochs", "50", "--batch", "32",
            "--limit-train", "2048", "--limit-test", "64", "--threads", "1", "--out", bad]
script = ('if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exec timeout -s KILL 4 "$@"; else exec "$@"; fi')
t0 = time.time()
rc, out, err = run(["sh", "-c", script, "sh"] + long_run, ranks=2, timeout=120)
print(f"rank 1 killed after 4 s: mpirun rc {rc} after {time.time() - t0:.0f} s")
if not (isinstance(rc, int) and rc != 0):
    failures.append(f"a rank killed mid-run: mpirun gave rc {rc} (expected a non-zero exit, no hang)")

# SIGTERM to mpirun: it passes the signal to the ranks, which agree to stop after the same step;
# rank 0 writes the checkpoint, from which one process continues.
stopped = os.path.join(work, "stopped")
p = subprocess.Popen(MPI + ["-np", "2"] + long_run[:-1] + [stopped], stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True, env=env, cwd=work)
time.sleep(4)
p.send_signal(signal.SIGTERM)
try:
    _, err = p.communicate(timeout=60)
    lines = open(os.path.join(stopped, "metrics.jsonl")).read().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    print(f"SIGTERM to mpirun: rc {p.returncode}, last metrics line {last}")
    # The ranks stop after the step the signal arrives in (a stopped_by line) or, when it arrives
    # during an evaluation, after that epoch's checkpoint (the last line is that epoch's).
    at_epoch_end = "test_accuracy" in last and last.get("epoch", 50) < 50
    if last.get("stopped_by") != "SIGTERM" and not at_epoch_end:
        failures.append(f"SIGTERM to mpirun: the run did not stop early: last metrics line {last}; {err[-300:]}")
    else:
        rc, _, err = run([train, "--resume", stopped, "--threads", "1", "--stop-after", "4"])
        if rc != 0:
            failures.append(f"resume after SIGTERM: rc {rc}: {err[-300:]}")
except subprocess.TimeoutExpired:
    p.kill()
    failures.append("SIGTERM to mpirun: the ranks did not stop within 60 s")
except OSError as e:
    failures.append(f"SIGTERM to mpirun: {e}")

shutil.rmtree(work, ignore_errors=True)
if failures:
    print(f"{len(failures)} failures:")
    for f in failures:
        print(" -", f)
    sys.exit(1)
print("all multi-process checks passed")
