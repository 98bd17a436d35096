"""Fresh processes for tests: reload a saved causal-LM checkpoint (after ``import hf_prune``, and with
``trust_remote_code=True`` without it) and generate there; run a recipe killed partway (``prune_killed``)."""

import json
import os
import subprocess
import sys

GENERATE_AFTER_RELOAD = r"""
import json, sys, torch
if sys.argv[2] == "hf_prune":
    import hf_prune
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "remote").eval()
inputs = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=int(sys.argv[4]), do_sample=False)
retainer = getattr(model, "retainer", None)
print(json.dumps({"tokens": out.tolist(), "class": type(model).__name__, "hf_prune": "hf_prune" in sys.modules,
                  "retainer": None if retainer is None
                  else sum(float(p.double().sum()) for p in retainer.parameters())}))
"""


def generate_after_reload(folder, inputs: dict, cwd, max_new_tokens: int = 6) -> dict[str, dict]:
    """{"hf_prune" | "remote": {"tokens", "class", "hf_prune" (imported?), "retainer" (weight sum or None)}},
    both processes run side by side; a failing one fails the test with its stderr."""
    payload = json.dumps({k: v.tolist() for k, v in inputs.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", GENERATE_AFTER_RELOAD, str(folder), mode, payload, str(max_new_tokens)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        for mode in ("hf_prune", "remote")
    }
    results = {}
    for mode, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
        results[mode] = json.loads(stdout.strip().splitlines()[-1])
    return results


KILL_AFTER_PUTS = """
import json, os, sys
from hf_prune import prune
from hf_prune.engine import activation_store

puts = 0
original = activation_store.ActivationStore.put

def put_then_die(self, key, tensors, **options):
    global puts
    original(self, key, tensors, **options)
    puts += 1
    if puts == int(sys.argv[2]):
        os._exit(137)  # as a kill: no clean-up, no exception handlers

activation_store.ActivationStore.put = put_then_die
prune(json.loads(sys.argv[1]), progress=False)
"""


def prune_killed(recipe: dict, puts: int) -> subprocess.CompletedProcess:
    """Run ``recipe`` in a fresh process killed right after the activation store's ``puts``-th entry."""
    return subprocess.run(
        [sys.executable, "-c", KILL_AFTER_PUTS, json.dumps(recipe), str(puts)],
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
