"""``val/token_accuracy`` and ``val/exact_match`` on batches whose right answer is known.

The model is replaced by one whose predictions are chosen by the test: teacher-forced logits are one-hot at the
chosen next tokens, ``generate`` returns the prompt followed by chosen tokens (padded after EOS, as transformers'
``generate`` does). The metrics then go through the real module, ``trainer.validate`` and the demo's BPE tokenizer.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cornstarch.models.multimodal_language_model.supervised_loss import at_positions, token_accuracy
from tests.lit.test_module import make_module

IGNORE = -100
VOCAB = 600


def one_hot_logits(predictions: torch.Tensor) -> torch.Tensor:
    return F.one_hot(predictions, VOCAB).float()


# ------------------------------------------------------------------------------------------- token accuracy
def labels_and_predictions(pad_left: bool):
    """Two samples: sample 0 supervises 3 tokens (2 predicted right), sample 1 supervises 2 (none right)."""
    labels = torch.tensor([[IGNORE, IGNORE, 10, 11, 12, IGNORE], [IGNORE, IGNORE, IGNORE, IGNORE, 20, 21]])
    # predictions[:, t] is the guess for labels[:, t + 1]
    predictions = torch.tensor([[0, 10, 99, 12, 0], [0, 0, 0, 98, 97]])
    if pad_left:  # the same samples shifted right behind padding (labels -100 there)
        labels = torch.cat([torch.full((2, 2), IGNORE), labels], 1)
        predictions = torch.cat([torch.full((2, 2), 5), predictions], 1)
    return labels, predictions


@pytest.mark.parametrize("pad_left", [False, True], ids=["right_pad", "left_pad"])
def test_token_accuracy_counts_known_predictions(pad_left):
    labels, predictions = labels_and_predictions(pad_left)
    logits = one_hot_logits(torch.cat([predictions, torch.zeros(2, 1, dtype=torch.long)], 1))  # last column unused
    correct, n = token_accuracy(SimpleNamespace(logits=logits), labels)
    assert (int(correct), int(n)) == (2, 5)

    # the same forward in the supervised-only layouts: logits at positions, and the chunked loss's predictions
    positions = (labels[:, 1:] != IGNORE).nonzero()
    flat = positions[:, 0] * labels.shape[1] + positions[:, 1]
    sparse = SimpleNamespace(logits=at_positions(logits, flat), logits_positions=flat)
    assert [int(v) for v in token_accuracy(sparse, labels)] == [2, 5]
    chunked = SimpleNamespace(logits=None, logits_positions=flat, predictions=at_positions(logits, flat).argmax(-1))
    assert [int(v) for v in token_accuracy(chunked, labels)] == [2, 5]


@pytest.mark.parametrize("which,expected", [("all", (5, 5)), ("none", (0, 5))])
def test_token_accuracy_all_and_none_correct(which, expected):
    labels, _ = labels_and_predictions(pad_left=True)
    right = labels[:, 1:].clamp(min=0)
    predictions = right if which == "all" else right + 1
    logits = one_hot_logits(torch.cat([predictions, torch.zeros(2, 1, dtype=torch.long)], 1))
    assert tuple(int(v) for v in token_accuracy(SimpleNamespace(logits=logits), labels)) == expected


# ------------------------------------------------------------------------------------------- through validate
class ChosenOutputs:
    """Stands in for the model's forward and generate, batch by batch, with outputs the test chose."""

    def __init__(self, tokenizer, batches: list[dict]):
        self.tokenizer, self.batches, self.calls = tokenizer, batches, 0

    def forward(self, input_ids, labels, **kwargs):
        chosen = self.batches[self.calls]["predictions"]
        return SimpleNamespace(loss=torch.tensor(1.0), logits=one_hot_logits(torch.cat(
            [chosen, torch.zeros(len(chosen), 1, dtype=torch.long)], 1)))

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        rows = []
        for text, eos in self.batches[self.calls]["generated"]:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids + ([eos_token_id] if eos else [])
            rows.append(ids[:max_new_tokens])
        width = max(map(len, rows))  # generation stops when every row is done
        self.calls += 1
        return torch.cat([input_ids, torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])], 1)


def eval_batch(answers: list[str], predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    n = len(answers)
    prompt = torch.tensor([[0, 0, 1, 7, 8]] * n)  # left-padded prompts
    return {"input_ids": labels.clamp(min=0), "attention_mask": (labels != IGNORE).long(), "labels": labels,
            "prompt_input_ids": prompt, "prompt_attention_mask": (prompt != 0).long(), "answers": answers,
            "predictions": predictions}


def test_validation_metrics_equal_the_known_answers(tmp_path):
    L.seed_everything(0, verbose=False)
    module = make_module()
    tok = module.processor.tokenizer
    labels, predictions = labels_and_predictions(pad_left=True)  # 2 of 5 tokens right
    all_right = labels[:, 1:].clamp(min=0)  # 5 of 5 right
    eight = " seven" * 8  # 8 tokens: fills max_new_tokens exactly, with no room for EOS
    assert len(tok(eight, add_special_tokens=False).input_ids) == module.generation.max_new_tokens == 8
    batches = [
        {**eval_batch(["seven", "three and nine"], predictions, labels),
         # exact; a longer answer cut short by an early EOS
         "generated": [(" seven", True), (" three", True)]},
        {**eval_batch([" four ", eight.strip(), "two"], torch.cat([all_right, all_right[:1]]),
                      torch.cat([labels, labels[:1]])),
         # exact (the reference's whitespace stripped); no EOS but the answer fills max_new_tokens; no EOS and the
         # model runs on past the answer (cut at max_new_tokens)
         "generated": [("four", True), (eight, False), (" two and two and two and two and", False)]},
    ]
    fake = ChosenOutputs(tok, batches)
    module.model.forward = fake.forward
    module.model.generate = fake.generate
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader([{k: v for k, v in b.items() if k not in ("predictions", "generated")}
                                          for b in batches], batch_size=None)
    metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert fake.calls == 2
    # token accuracy is the token-weighted mean over the epoch: (2 + 8) / (5 + 8), not the mean of 2/5 and 8/8
    assert metrics["val/token_accuracy"] == pytest.approx(10 / 13)
    assert metrics["val/exact_match"] == pytest.approx(3 / 5)
