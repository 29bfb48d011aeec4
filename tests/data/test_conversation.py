"""Chat rendering: answer segments, and the render cache follows the tokenizer's template."""

from __future__ import annotations

from cornstarch.data.conversation import render_segments
from tests import tiny

TEMPLATE = ("{{% for m in messages %}}{open}{{{{ m['role'] }}}}{close} {{{{ m['content'] }}}}{{{{ eos_token }}}}{{% endfor %}}"
            "{{% if add_generation_prompt %}}{open}assistant{close} {{% endif %}}")
MESSAGES = [{"role": "user", "content": "<image> which digit ?"}, {"role": "assistant", "content": "seven"}]


def test_render_cache_follows_template_changes():
    tok = tiny.tokenizer()
    tok.chat_template = TEMPLATE.format(open="[", close="]")
    first = render_segments(tok, MESSAGES, 0)
    assert first == render_segments(tok, MESSAGES, 0)
    assert first[-1] == ("seven" + tok.eos_token, True)
    tok.chat_template = TEMPLATE.format(open="<<", close="]")
    second = render_segments(tok, MESSAGES, 0)
    assert second != first and second[0][0].startswith("<<user]")
    assert second[-1] == ("seven" + tok.eos_token, True)
