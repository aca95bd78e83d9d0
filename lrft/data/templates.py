"""Named chat templates for tokenizers that ship none: ``dataset.chat_template=NAME`` (training)
and ``chat_template=NAME`` (``lrft generate``). Each renders a conversation prefix by prefix (what
:mod:`lrft.data.chat` needs to find the assistant tokens) and ends every turn with its family's
end-of-turn marker, at which generation stops (:data:`lrft.data.chat.END_OF_TURN`).

The formats follow each family's published template; a tokenizer's own template always wins when
it has one (``chat_template`` unset).
"""

from __future__ import annotations

# ChatML (OpenAI's; SmolLM, Qwen): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen 2.5: ChatML with its default system message when the conversation has none
QWEN = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML
)

# Llama 3 / 3.1 / 3.2: headers and <|eot_id|>; the BOS token is written by the template
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 2 / 3: roles user and model; a system message is prepended to the first user turn
GEMMA = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% set first = loop.index0 <= 1 and role == 'user' %}"
    "{% set text = system + message['content'] if first else message['content'] %}"
    "{{ '<start_of_turn>' + role + '\n' + text | trim + '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Mistral (v0.3 instruct): [INST] user [/INST]assistant</s>; the system message joins the first user turn
MISTRAL = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set text = system + message['content'] if loop.index0 <= 1 else message['content'] %}"
    "{{ '[INST] ' + text | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Phi-3 / 3.5: <|role|>\ncontent<|end|>\n
PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED_TEMPLATES = {
    "chatml": CHATML,
    "qwen": QWEN,
    "llama3": LLAMA3,
    "gemma": GEMMA,
    "mistral": MISTRAL,
    "phi3": PHI3,
}
