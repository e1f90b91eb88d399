#!/usr/bin/env python3
"""The programs as a hostile user runs them (docs/reliability.md): every bad flag, file and disk
must end in a one-line error and a non-zero exit, never a crash (a signal), a hang or a silent
exit 0; the first SIGINT/SIGTERM stops training with a checkpoint from which --resume continues.

    tests/hostile_input.py BUILD_DIR      (a meson test of the unit suite)
"""
import json, os, resource, shutil, signal, struct, subprocess, sys, tempfile, time

build = os.path.abspath(sys.argv[1])
train, evalp, viz = (os.path.join(build, "apps", p) for p in ("train", "eval", "viz"))
work = tempfile.mkdtemp(prefix="moevit_hostile_")
env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
failures = []
cases = 0
TINY = ["--dataset", "synthetic", "--model", "vmoe-tiny", "--epochs", "1", "--batch", "32",
        "--limit-train", "64", "--limit-test", "32", "--threads", "1"]


def run(args, limit_file_bytes=None, timeout=120):
    def pre():
        if limit_file_bytes is not None:  # a disk that fills after this many bytes
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: writes get EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                           preexec_fn=pre, cwd=work)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return "hang", "", ""


def expect_error(args, message, **kw):
    """An error that contains `message` and an exit code of 1..127: 1 from moevit's own checks,
    100-115 from CLI11's parser (a flag it does not know or cannot convert); 128 + N would be a
    death by signal N."""
    global cases
    cases += 1
    rc, out, err = run(args, **kw)
    if not (isinstance(rc, int) and 1 <= rc <= 127) or message not in err:
        failures.append(f"{' '.join(os.path.basename(a) for a in args[:1])} {' '.join(args[1:])}: "
                        f"rc {rc}, expected 1..127 and an error containing {message!r}; stderr: "
                        f"{err[-400:]!r}")


def checkpoint_with_metadata(src, dst, change):
    """A copy of safetensors file src with its metadata changed by change(meta)."""
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header["__metadata__"])
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    open(dst, "wb").write(struct.pack("<Q", len(h)) + h + raw[8 + n:])


# A small MoE run whose checkpoint the eval and viz cases read.
run_dir = os.path.join(work, "run")
rc, out, err = run([train] + TINY + ["--out", run_dir])
assert rc == 0, f"the reference run failed: {err}"
ckpt = os.path.join(run_dir, "checkpoint.safetensors")

# --- train: flags --------------------------------------------------------------------------
for flags, message in [
    (["--threads", "100000"], "--threads must be in 1.."), (["--threads", "-1"], "--threads"),
    (["--epochs", "0"], "--epochs"), (["--epochs", "-5"], "--epochs"),
    (["--batch", "0"], "--batch"), (["--batch", "100000000"], "--batch"),
    (["--eval-batch", "0"], "--eval-batch"), (["--limit-train", "0"], "--limit-train"),
    (["--limit-test", "-1"], "--limit-test"), (["--stop-after", "0"], "--stop-after"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--weight-decay", "inf"], "--weight-decay"), (["--momentum", "nan"], "--momentum"),
    (["--warmup", "1e30"], "--warmup"), (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--clip", "-inf"], "--clip"), (["--dim", "0"], "width 0"), (["--dim", "100000"], "width"),
    (["--depth", "2000000000"], "depth 2000000000"), (["--heads", "0"], "heads"),
    (["--mlp-dim", "-1"], "mlp_dim -1"), (["--patch", "0"], "patch"), (["--patch", "5"], "patch"),
    (["--dim", "60000", "--heads", "1"], "GiB of memory available"),
    (["--batch", "60000"], "training with --batch 60000"),
    (["--experts", "0"], "--experts"), (["--experts", "999999"], "--experts"),
    (["--k", "0"], "--k"), (["--k", "9"], "--k"), (["--capacity", "-1"], "--capacity"),
    (["--capacity", "inf"], "--capacity"), (["--eval-capacity", "nan"], "--eval-capacity"),
    (["--noise-std", "nan"], "--noise-std"), (["--load-weight", "-1"], "--load-weight"),
    (["--moe", "sometimes"], "MoE placement"), (["--moe", "last-n", "--moe-last-n", "99"], "last-n"),
    (["--router", "hash"], "unknown type 'hash'"), (["--expert-mlp-dim", "0"], "expert hidden width"),
    (["--prc", "--prc-diag-weight", "inf"], "--prc-diag-weight"),
    (["--prc", "--prc-blocks", "99"], "--prc-blocks"), (["--jaccard-weight", "nan"], "--jaccard-weight"),
    (["--jaccard-sigma", "0"], "--jaccard-sigma"), (["--optimizer", "lamb"], "--optimizer"),
    (["--schedule", "step"], "--schedule"), (["--augment", "mixup"], "--augment"),
    (["--device", "tpu"], "--device"), (["--dataset", "imagenet"], "imagenet"),
    (["--out", "/dev/null"], "/dev/null"), (["--epochs", "ten"], "--epochs"),
    (["--no-such-flag", "1"], "no-such-flag"), (["--ema", "--ema-decay", "1"], "--ema-decay"),
    (["--ema-decay", "nan"], "--ema-decay"), (["--time-budget", "0"], "--time-budget"),
    (["--time-budget", "-5"], "--time-budget"), (["--time-budget", "inf"], "--time-budget"),
    (["--stem", "resnet"], "stem 'resnet'"), (["--stem", "conv", "--patch", "7"], "power of 2"),
    (["--pool", "max"], "pool 'max'"), (["--prc", "--prc-share", "0"], "--prc-share"),
    (["--prc", "--prc-share", "nan"], "--prc-share"), (["--prc", "--prc-area1", "0.9,0.2"], "--prc-area1"),
    (["--prc", "--prc-area2", "0.5"], "--prc-area2"),
]:
    expect_error([train] + TINY + ["--out", os.path.join(work, "bad")] + flags, message)
expect_error([train, "--resume", run_dir, "--epochs", "5"], "--epochs cannot be changed")

# --- train: data folders that are missing, or whose files are truncated or wrong --------------
bad_data = os.path.join(work, "bad_data")
os.makedirs(bad_data)
header = struct.pack(">IIII", 0x803, 60000, 28, 28)  # announces 60000 images, holds 10
for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
    open(os.path.join(bad_data, name), "wb").write(header + bytes(10 * 28 * 28))
for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
    open(os.path.join(bad_data, name), "wb").write(struct.pack(">II", 0x801, 60000) + bytes(10))
for flags, message in [
    (["--dataset", "fashion-mnist", "--data-dir", os.path.join(work, "none")], "none"),
    (["--dataset", "mnist", "--data-dir", bad_data], "train-images-idx3-ubyte"),
    (["--dataset", "cifar10", "--data-dir", bad_data], "bad_data"),
]:
    expect_error([train, "--model", "vit-tiny", "--epochs", "1", "--out",
                  os.path.join(work, "bad")] + flags, message)
expect_error([train, "--resume", os.path.join(work, "nothing")], "no checkpoint at")

# --- eval and viz: flags --------------------------------------------------------------------
for flags, message in [
    (["--batch", "0"], "--batch"), (["--batch", "100000000"], "--batch"),
    (["--limit", "0"], "--limit"), (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"), (["--consistency", "--sigmas", "nan"], "--sigmas"),
    (["--consistency", "--sigmas", "inf"], "--sigmas"), (["--consistency", "--sigmas", "-1"], "--sigmas"),
    (["--consistency", "--noise-on", "block:99"], "block:99"), (["--sigmas", "0.1"], "--consistency"),
    (["--dump-logits", "/dev/full"], "is a device"), (["--dump-logits", work], "is a folder"),
]:
    expect_error([evalp, run_dir] + flags, message)
for flags, message in [
    (["--images", "0"], "--images"), (["--images", "100000000"], "--images"),
    (["--first", "-1"], "--first"), (["--columns", "0"], "--columns"), (["--scale", "1000"], "--scale"),
    (["--sigma", "nan"], "--sigma"), (["--capacity", "inf"], "--capacity"), (["--layer", "7"], "--layer"),
    (["--slot", "-1", "--picture", "soft"], "soft"), (["--threads", "99999"], "--threads"),
    (["--out", "/dev/null"], "/dev/null"), (["--first", "100000000"], "first"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
]:
    expect_error([viz, run_dir] + flags, message)

# --- hostile checkpoints --------------------------------------------------------------------
raw = open(ckpt, "rb").read()
truncated = os.path.join(work, "truncated.safetensors")
open(truncated, "wb").write(raw[: len(raw) // 2])
for prog in (evalp, viz):
    expect_error([prog, truncated], "truncated.safetensors")
    expect_error([prog, "/dev/null"], "/dev/null")


def with_config(key, value):
    def change(meta):
        c = json.loads(meta["config"])
        c[key] = value
        meta["config"] = json.dumps(c)
    return change


for name, change, message in [
    ("deep", with_config("depth", 1000000000), "depth 1000000000"),
    ("wide", with_config("dim", 65536), "GiB of memory available"),
    ("typed", with_config("depth", "six"), "training configuration"),
    ("noconfig", lambda m: m.pop("config"), "no training configuration"),
]:
    bad = os.path.join(work, f"{name}.safetensors")
    checkpoint_with_metadata(ckpt, bad, change)
    for prog in (evalp, viz):
        expect_error([prog, bad], message)
# --eval-flip: eval does as the run did unless told (not hostile, but this run is at hand).
flipped_run = os.path.join(work, "flipped.safetensors")
checkpoint_with_metadata(ckpt, flipped_run, with_config("eval_flip", True))
for path, flags, want in [(ckpt, [], False), (ckpt, ["--eval-flip"], True),
                          (flipped_run, [], True), (flipped_run, ["--no-eval-flip"], False)]:
    cases += 1
    rc, out, err = run([evalp, path, "--limit", "32"] + flags)
    if rc != 0 or ("mirror image" in out) != want:
        failures.append(f"eval {os.path.basename(path)} {' '.join(flags)}: rc {rc}, expected the "
                        f"mirror images {'used' if want else 'unused'}; stdout {out[-300:]!r}")
for key, value, message in [("epoch", "-1", "'epoch' is '-1'"), ("epoch", "1e99", "'epoch'"),
                            ("optimizer_steps", "x", "'optimizer_steps' is 'x'"),
                            ("train_seconds", "inf", "'train_seconds'")]:
    bad_run = os.path.join(work, f"bad_{key}_{value}")
    shutil.copytree(run_dir, bad_run)
    checkpoint_with_metadata(ckpt, os.path.join(bad_run, "checkpoint.safetensors"),
                             lambda m: m.__setitem__(key, value))
    expect_error([train, "--resume", bad_run], message)

# --- a full disk: the write fails by name, the old file stays, no temp file is left ----------
viz_out = os.path.join(work, "viz")
rc, _, err = run([viz, run_dir, "--images", "2", "--picture", "experts", "--out", viz_out])
assert rc == 0, err
pngs = {f: open(os.path.join(viz_out, f), "rb").read() for f in os.listdir(viz_out)}
expect_error([viz, run_dir, "--images", "16", "--scale", "16", "--picture", "experts", "--out",
              viz_out], "cannot write", limit_file_bytes=4096)
if {f: open(os.path.join(viz_out, f), "rb").read() for f in os.listdir(viz_out)} != pngs:
    failures.append("viz on a full disk changed or left files in --out")
full_run = os.path.join(work, "full")
expect_error([train] + TINY + ["--out", full_run], "cannot write", limit_file_bytes=64 << 10)
if [f for f in os.listdir(full_run) if ".tmp." in f]:
    failures.append("train on a full disk left a temp file")
expect_error([evalp, run_dir, "--consistency", "--limit", "32", "--report",
              os.path.join(work, "report")], "cannot write", limit_file_bytes=1024)

# --- graceful stop ---------------------------------------------------------------------------
def start_long_run(out):
    args = [train, "--dataset", "synthetic", "--model", "vmoe-tiny", "--epochs", "50", "--batch",
            "32", "--limit-test", "32", "--threads", "1", "--out", out]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=work)
    p.stdout.readline()  # "model ...": the run has started
    time.sleep(2)
    return p


stop_dir = os.path.join(work, "stopped")
p = start_long_run(stop_dir)
p.send_signal(signal.SIGINT)
try:
    out, err = p.communicate(timeout=60)
except subprocess.TimeoutExpired:
    p.kill()
    out, err = p.communicate()
    failures.append("SIGINT did not stop training within 60 s")
if p.returncode != 130 or "stopped by SIGINT" not in out or f"--resume {stop_dir}" not in out:
    failures.append(f"SIGINT: rc {p.returncode}, expected 130 and a resume line; stdout "
                    f"{out[-300:]!r}")
else:
    lines = open(os.path.join(stop_dir, "metrics.jsonl")).read().splitlines()
    if json.loads(lines[-1]).get("stopped_by") != "SIGINT":
        failures.append(f"SIGINT: the last metrics line does not say so: {lines[-1]!r}")
    rc, out, err = run([train, "--resume", stop_dir, "--stop-after", "1"], timeout=300)
    if rc != 0 or "resuming" not in out:
        failures.append(f"resume after SIGINT: rc {rc}; stderr {err[-300:]!r}")

p = start_long_run(os.path.join(work, "killed"))
p.send_signal(signal.SIGTERM)
time.sleep(0.05)
p.send_signal(signal.SIGTERM)
try:
    p.communicate(timeout=10)
except subprocess.TimeoutExpired:
    p.kill()
    failures.append("a second SIGTERM did not end training at once")
if p.returncode != 143:
    failures.append(f"two SIGTERMs: rc {p.returncode}, expected 143")

shutil.rmtree(work, ignore_errors=True)
for f in failures:
    print("FAIL:", f)
print(f"hostile input: {cases} error cases and the stop signals, {len(failures)} failures")
sys.exit(1 if failures else 0)
