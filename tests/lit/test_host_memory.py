"""keep_freed_host_memory: the train steps of an LM with a 32k x 256 embedding and head page-fault their ~31 MiB
gradients in again every step under glibc's default thresholds, and not once freed memory is kept; the user's own
MALLOC_* settings and CORNSTARCH_KEEP_FREED_MEMORY=0 are respected; the ``cornstarch`` command applies it."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from cornstarch.lit.host_memory import on_glibc

pytestmark = pytest.mark.skipif(not on_glibc(), reason="glibc's malloc only")

STEPS = """
import json, resource, sys, torch
import transformers as tf
from cornstarch.lit import host_memory
applied = host_memory.keep_freed_host_memory() if sys.argv[1] == "kept" else False
torch.manual_seed(0)
config = tf.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
model = tf.LlamaForCausalLM(config)  # embedding and head: 31.25 MiB each
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
tokens = torch.randint(0, 32000, (4, 64))
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = model(input_ids=tokens, logits_to_keep=17).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, -16:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[3:]}))
"""


def python(code: str, *args: str, **env: str) -> str:
    """The last line ``code`` prints, run in a fresh interpreter without the caller's ``MALLOC_*`` settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout
    return out.splitlines()[-1]


def run(mode: str, **env: str) -> dict:
    return json.loads(python(STEPS, mode, **env))


def test_freed_gradients_are_reused_instead_of_page_faulted_in_every_step():
    pages = 2 * 32000 * 256 * 4 // 4096  # of the embedding's and the head's gradients
    default, kept = run("default"), run("kept")
    assert statistics.median(default["faults"]) > pages // 2, default  # given back to the kernel, faulted in again
    assert kept["applied"] and statistics.median(kept["faults"]) < pages // 100, kept


def test_the_users_malloc_settings_and_the_opt_out_are_kept():
    assert run("kept", MALLOC_TRIM_THRESHOLD_="0")["applied"] is False
    assert run("kept", CORNSTARCH_KEEP_FREED_MEMORY="0")["applied"] is False


def test_the_cornstarch_command_applies_it():
    code = ("from cornstarch.lit import cli, host_memory\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(host_memory.applied)")
    assert python(code) == "True"
