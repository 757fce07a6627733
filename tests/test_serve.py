"""``python -m mosld.serve`` in a real server process on a free port, driven by the official ``openai`` client
(and raw HTTP for the bad requests): a run's routed MoSLD adapter on a tiny random Llama."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import REPO, write_routed_run

import mosld
from mosld.data.generation import encode_generation_examples
from mosld.data.tasks import generation_defaults, load_task
from mosld.evaluation import evaluate
from mosld.evaluation.decoding import DecodeOptions, left_pad
from mosld.evaluation.generation_scoring import generate_batch, generate_items
from mosld.models import load_base_model, load_tokenizer
from mosld.serve.model import load_served_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow  # runs the real entry point in a subprocess

CHAT_TASK = str(REPO / "data" / "example_chat")
PLAIN_TASK = str(REPO / "data" / "example_instructions")
PROMPTS = ["The weather today", "Once upon a time in a land far away there lived", "1 2 3", "Dear"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run as fit leaves it: config.yaml naming the tiny base, and a routed MoSLD adapter/."""
    return write_routed_run(tiny_model_dir, tmp_path_factory.mktemp("run"), trainer={"precision": "32-true"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """The server on the run, its log file; a batch waits 300 ms for others so that concurrent requests meet."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "mosld.serve", "--run", str(run_dir), "--port", str(port), "--threads", "1",
               "--batch-window-ms", "300", "--max-tokens", "256"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while not healthy(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield url, port, log
    process.terminate()
    process.wait(30)


def healthy(port: int) -> bool:
    try:
        return raw(port, "GET", "/health")[0] == 200
    except OSError:
        return False


def raw(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def complete(client, prompt, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.completions.create(model="mosld", prompt=prompt, **kw)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["mosld"]
    status, health = raw(server[1], "GET", "/health")
    assert status == 200 and health["status"] == "ok" and "routed per token" in health["serving"]


def test_chat_and_completion_answer_with_usage(client, server, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="mosld", messages=messages, max_tokens=8, temperature=0)
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        len(prompt), 8, len(prompt) + 8)  # fmt: skip
    parts = {"model": "mosld", "max_tokens": 8, "temperature": 0,
             "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]}  # fmt: skip
    status, answer = raw(server[1], "POST", "/v1/chat/completions", json.dumps(parts).encode())
    assert status == 200 and answer["choices"][0]["message"]["content"] == chat.choices[0].message.content
    text = complete(client, PROMPTS[0])
    assert text.object == "text_completion" and text.choices[0].text and text.usage.completion_tokens == 12
    assert text.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])
    assert complete(client, PROMPTS[0]).choices[0].text == text.choices[0].text  # greedy repeats
    assert complete(client, PROMPTS[0], echo=True).choices[0].text == PROMPTS[0] + text.choices[0].text


def test_streamed_answers_add_up_to_the_whole_answer(client):
    whole = complete(client, PROMPTS[1]).choices[0].text
    chunks = list(complete(client, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # sent piece by piece
    assert chunks[-1].usage.completion_tokens == 12
    messages = [{"role": "user", "content": "Say something."}]
    answer = client.chat.completions.create(model="mosld", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="mosld", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)  # fmt: skip
    deltas = [c.choices[0] for c in stream]
    assert deltas[0].delta.role == "assistant" and deltas[-1].finish_reason == "length"
    assert "".join(d.delta.content or "" for d in deltas) == answer.choices[0].message.content


def test_stop_strings_cut_the_answer(client):
    whole = complete(client, PROMPTS[2], max_tokens=16).choices[0].text
    stop = whole[6:8]
    cut = complete(client, PROMPTS[2], max_tokens=16, stop=[stop, "never-generated"])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = complete(client, PROMPTS[2], max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole[: whole.index(stop)]


def test_ignore_eos_answers_exactly_max_tokens(client):
    answer = complete(client, PROMPTS[2], max_tokens=24, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 24 and answer.choices[0].finish_reason == "length"


def test_seeded_sampling_repeats(client):
    first, second, other = (complete(client, PROMPTS[0], temperature=1.5, top_p=0.95, seed=s).choices[0].text
                            for s in (3, 3, 4))  # fmt: skip
    assert first == second and first != other


def test_a_request_answers_the_same_alone_and_in_a_batch(client):
    """Greedy tokens do not depend on the batch: alone, then with three prompts of other lengths (and a sampled
    one) in the same batch, the batch header says how many rows decoded together."""
    alone = client.completions.with_raw_response.create(model="mosld", prompt=PROMPTS[1], max_tokens=16,
                                                        temperature=0)  # fmt: skip
    assert alone.headers["x-mosld-batch-rows"] == "1"
    options = [dict(temperature=0, max_tokens=5), dict(temperature=0), dict(temperature=1.0, seed=1),
               dict(temperature=0, stop=["e"])]  # fmt: skip

    def send(i: int):
        kw = {"max_tokens": 16, **options[i]}
        return client.completions.with_raw_response.create(model="mosld", prompt=PROMPTS[i], **kw)

    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(send, [1, 0, 2, 3]))
    assert [r.headers["x-mosld-batch-rows"] for r in batched] == ["4"] * 4
    assert batched[0].parse().choices[0].text == alone.parse().choices[0].text
    assert batched[0].parse().usage.completion_tokens == alone.parse().usage.completion_tokens == 16


def test_sixteen_concurrent_clients_are_all_answered(client, server):
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: complete(client, PROMPTS[i % 4], max_tokens=4 + i % 3), range(16)))
    assert [a.usage.completion_tokens for a in answers] == [4 + i % 3 for i in range(16)]
    assert raw(server[1], "GET", "/health")[1]["largest_batch"] > 1


def test_served_answers_are_mosld_evaluates_generations(client, run_dir, tiny_model_dir, tokenizer):
    """The same items decoded by the server (chat template and plain token prompts) and by ``mosld.evaluate``'s
    generation path on the same model: the same texts, and the metric of the served texts is evaluate's."""
    model = mosld.load_adapter(load_base_model(tiny_model_dir), run_dir / "adapter").eval()
    overrides = {"max_new_tokens": 8, "metric": "token_f1"}
    for task in (CHAT_TASK, PLAIN_TASK):
        examples = load_task(task, "test")
        spec = generation_defaults(task).replace(overrides)
        items = encode_generation_examples(examples, tokenizer, spec, 256)
        expected = generate_items(model, tokenizer, items, spec, batch_size=4)
        if spec.template == "chat":
            served = [client.chat.completions.create(
                model="mosld", max_tokens=8, temperature=0, stop=list(spec.stop) or None,
                messages=[{"role": r, "content": c} for r, c in [*e.history, ("user", e.prompt)]],
            ).choices[0].message.content for e in examples]  # fmt: skip
        else:
            served = [complete(client, item.prompt, max_tokens=8, stop=list(spec.stop)).choices[0].text
                      for item in items]  # fmt: skip
        assert [s.strip() for s in served] == expected
        assert len(set(expected)) > 1  # the items get different answers: a real comparison
        result = evaluate(model, tokenizer, [task], split="test", generation={Path(task).name: overrides})
        score = mosld.evaluation.generation_scoring.score_generations([s.strip() for s in served],
                                                               [i.references for i in items], "token_f1")  # fmt: skip
        assert result["accuracy"][Path(task).name] == pytest.approx(sum(score) / len(score))
    assert generation_defaults(CHAT_TASK).template == "chat" and generation_defaults(PLAIN_TASK).template == "plain"


CHAT = {"model": "mosld", "messages": [{"role": "user", "content": "x"}]}
BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"model": "mosld", "prompt": ', 400),
    "not an object": ("/v1/completions", b'["mosld"]', 400),
    "non-UTF-8 bytes": ("/v1/completions", b'{"model": "mosld", "prompt": "caf\xe9 \xff"}', 400),
    "missing prompt": ("/v1/completions", {"model": "mosld"}, 400),
    "missing messages": ("/v1/chat/completions", {"model": "mosld"}, 400),
    "no messages": ("/v1/chat/completions", {"model": "mosld", "messages": []}, 400),
    "wrong role": ("/v1/chat/completions", {"model": "mosld", "messages": [{"role": "robot", "content": "x"}]}, 400),
    "max_tokens a string": ("/v1/completions", {"model": "mosld", "prompt": "x", "max_tokens": "8"}, 400),
    "stream a string": ("/v1/completions", {"model": "mosld", "prompt": "x", "stream": "yes"}, 400),
    "ignore_eos a string": ("/v1/completions", {"model": "mosld", "prompt": "x", "ignore_eos": "yes"}, 400),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    "prompt over the context": ("/v1/completions", {"model": "mosld", "prompt": [17] * 600}, 400),
    "answer over the context": ("/v1/completions", {"model": "mosld", "prompt": [17] * 500, "max_tokens": 60}, 400),
    "max_completion_tokens 0": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, 400),
    "content a number": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 7}]}, 400),
    "max_tokens 0": ("/v1/completions", {"model": "mosld", "prompt": "x", "max_tokens": 0}, 400),
    "max_tokens negative": ("/v1/completions", {"model": "mosld", "prompt": "x", "max_tokens": -3}, 400),
    "max_tokens absurd": ("/v1/completions", {"model": "mosld", "prompt": "x", "max_tokens": 10**12}, 400),
    "temperature negative": ("/v1/completions", {"model": "mosld", "prompt": "x", "temperature": -1}, 400),
    "top_p 0": ("/v1/completions", {"model": "mosld", "prompt": "x", "top_p": 0}, 400),
    "n 2": ("/v1/completions", {"model": "mosld", "prompt": "x", "n": 2}, 400),
    "empty prompt": ("/v1/completions", {"model": "mosld", "prompt": ""}, 400),
    "token id out of range": ("/v1/completions", {"model": "mosld", "prompt": [10**9]}, 400),
    "five stop strings": ("/v1/completions", {"model": "mosld", "prompt": "x", "stop": list("abcde")}, 400),
    "unknown route": ("/v1/embeddings", {"model": "mosld", "input": "x"}, 404),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_a_json_error_and_the_server_goes_on(case, server, client):
    path, body, status = BAD_REQUESTS[case]
    got, answer = raw(server[1], "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status and 400 <= got < 500
    assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    assert complete(client, PROMPTS[3], max_tokens=2).usage.completion_tokens == 2


def test_a_client_leaving_mid_stream_cancels_its_row_and_nothing_crashes(server, client):
    url, port, log = server
    body = json.dumps({"model": "mosld", "prompt": PROMPTS[0], "max_tokens": 256, "temperature": 0, "stream": True})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
        received = b""
        while b"data:" not in received:
            received += sock.recv(4096)
    assert b"200 OK" in received
    assert complete(client, PROMPTS[3], max_tokens=3).usage.completion_tokens == 3  # the next request is answered
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text
    health = raw(port, "GET", "/health")[1]
    assert health["errors"] == 0 and health["cancelled"] == 1  # its row stopped before its 256 tokens


def test_static_gates_and_peft_serve_the_collapsed_adapter(run_dir, tiny_model_dir, tmp_path):
    """--static-gates NAME loads fixed gates from the run's peft/gates.json (scripts/export_peft.py's format);
    --peft serves the same collapse exported as a peft LoRA, run by peft."""
    routed = load_served_model(run=run_dir, device="cpu")
    layers = mosld.adapters.static.routed_layers(routed.model)
    gates = {name: torch.softmax(torch.arange(layer.num_experts, dtype=torch.float32), 0).tolist()
             for name, layer in layers.items()}  # fmt: skip
    gates_file = run_dir / "peft" / "gates.json"
    gates_file.parent.mkdir(exist_ok=True)
    gates_file.write_text(json.dumps({"adapters": {"mixture": {"gates": gates}}}))
    fixed = load_served_model(run=run_dir, device="cpu", static_gates="mixture")
    assert all(layer.static_gates is not None for layer in mosld.adapters.static.routed_layers(fixed.model).values())
    ids = torch.tensor([[5, 17, 300, 2]])
    assert not torch.allclose(routed.model(input_ids=ids).logits, fixed.model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="mixture"):
        load_served_model(run=run_dir, device="cpu", static_gates="arc_easy")
    gates_file.write_text(json.dumps({"adapters": {"mixture": {"gates": list(gates.values())}}}))
    with pytest.raises(ValueError, match="expected a gates.json written by scripts/export_peft.py"):  # not a crash
        load_served_model(run=run_dir, device="cpu", static_gates="mixture")
    pytest.importorskip("peft")
    mosld.export_peft(routed.model, tmp_path / "lora", {k: torch.tensor(v) for k, v in gates.items()})
    for merge in (False, True):
        lora = load_served_model(peft=tmp_path / "lora", device="cpu", merge_peft=merge)
        assert "peft LoRA" in lora.description
        torch.testing.assert_close(lora.model(input_ids=ids).logits, fixed.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip


def test_a_quantized_base_is_served_with_its_adapter(run_dir, tokenizer):
    """--quantization-bits 4 (or the run's model.quantization): the adapters wrap bitsandbytes' 4-bit layers."""
    pytest.importorskip("bitsandbytes")
    served = load_served_model(run=run_dir, device="cpu", quantization_bits=4)
    assert type(served.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = {**left_pad([[5, 17, 300], [9]], tokenizer.pad_token_id), "generation": DecodeOptions(4)}
    texts = generate_batch(served.model, batch, tokenizer)
    assert len(texts) == 2 and all(texts)


def test_what_to_serve_is_resolved_with_errors_naming_the_options(tmp_path):
    with pytest.raises(ValueError, match="give --run, --adapter or --base"):
        load_served_model(device="cpu")
    with pytest.raises(ValueError, match="--run, --adapter and --peft: give one"):
        load_served_model(run=tmp_path, peft=tmp_path, device="cpu")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match=f"--peft {re.escape(str(tmp_path))}: .* does not name the base model"):
        load_served_model(peft=tmp_path, device="cpu")
