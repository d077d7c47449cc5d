"""capture() and `mixtral-mlx analyze`: captures equal the model's own outputs, attention maps
are proper (rows sum to 1, causal, windowed), statistics are exact on hand-made routings, and
every command runs on tiny models and reports hand-set routes exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mixtral_mlx  # noqa: F401  (before mlx: preloads OpenBLAS)
import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_user_error, run_cli

from mixtral_mlx import capture, load_preset, save
from mixtral_mlx.analysis import Routing, attention_weights, expert_statistics, token_windows, uniform_rates
from mixtral_mlx.cache import make_cache
from mixtral_mlx.data import tokenize_split
from mixtral_mlx.model import Model, init_weights
from mixtral_mlx.tokenizer import SentencePieceTokenizer

PROSE = """\
The quick brown fox jumps over the lazy dog, and the dog sleeps in the warm sun.
A small bird sings on the old stone wall; the cat watches it from the garden.
In 1998 the city built 42 new houses near the river, and 7 bridges over it.
She said: "Where is the key?" He answered, "On the table, next to the lamp."
Rain fell all night. In the morning the streets were wet and the air was cold.
"""


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer(sp_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_model)


def tiny_model(**overrides) -> Model:
    args = load_preset("tiny")
    for name, value in overrides.items():
        setattr(args, name, value)
    model = init_weights(Model(args), seed=0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    return save(tiny_model(), tokenizer, tmp_path_factory.mktemp("models") / "tiny")


# Hand-set routing: with attention and expert outputs zeroed, every layer's router sees the
# token's embedding, 2 * basis[first(t)] + basis[second(t)], and layer l's router row e reads
# basis[PERMUTATION[l][e]]; so token t goes to the experts e with PERMUTATION[l][e] = first(t), second(t).
PERMUTATION = [[0, 1, 2, 3], [2, 0, 3, 1]]


def designed_experts(token: int, layer: int) -> list[int]:
    first = token % 4
    second = (first + 1 + (token // 4) % 3) % 4
    inverse = np.argsort(PERMUTATION[layer])
    return [int(inverse[first]), int(inverse[second])]


@pytest.fixture(scope="module")
def routed_model_dir(tmp_path_factory, tokenizer) -> Path:
    model = tiny_model()
    V, h = model.args.vocab_size, model.args.hidden_size
    embedding = np.zeros((V, h), np.float32)
    for t in range(V):
        first, second = designed_experts(t, 0)
        embedding[t, first], embedding[t, second] = 2.0, 1.0
    model.model.embed_tokens.weight = mx.array(embedding)
    for layer, perm in zip(model.layers, PERMUTATION):
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.block_sparse_moe.experts.w2.weight = mx.zeros_like(layer.block_sparse_moe.experts.w2.weight)
        layer.block_sparse_moe.gate.weight = mx.array(np.eye(4, h, dtype=np.float32)[perm])
    return save(model, tokenizer, tmp_path_factory.mktemp("models") / "routed")


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    lines = {"prose": [{"text": line} for line in PROSE.splitlines()] * 3,
             "chat": [{"messages": [{"role": "user", "content": "Where is the key?"},
                                    {"role": "assistant", "content": f"On table {i}."}]} for i in range(12)]}
    dirs = {}
    for name, records in lines.items():
        d = root / name
        d.mkdir()
        (d / ("valid.jsonl" if name == "chat" else "val.jsonl")).write_text(
            "".join(json.dumps(r) + "\n" for r in records))
        dirs[name] = d
    return dirs


def ids(tokenizer: Tokenizer, text: str = "The quick brown fox jumps over the lazy dog.") -> mx.array:
    return mx.array([tokenizer.encode(text, bos=True)])


def cli(*args, cwd: Path):
    return run_cli(*map(str, args), cwd=cwd)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000, path


# ---------------------------------------------------------------------- capture
def test_capture_equals_the_models_own_outputs(tokenizer):
    model = tiny_model()
    x = ids(tokenizer)
    reference = model.forward(x, router_logits=True, hidden_states=True)
    with capture(model) as rec:
        out = model.forward(x)
    assert mx.array_equal(out.logits, reference.logits)  # the fast path is untouched
    assert len(rec.hidden_states) == len(reference.hidden_states) == 3
    for got, want in zip(rec.hidden_states, reference.hidden_states):
        assert mx.array_equal(got, want)
    for i, want in enumerate(reference.router_logits):
        assert mx.array_equal(rec.router_logits[i], want)


def test_captured_experts_are_the_routers_choices(tokenizer):
    model = tiny_model()
    x = ids(tokenizer)
    with capture(model, layers=[-1], what="router") as rec:
        model(x)
    h = model.forward(x, hidden_states=True).hidden_states[-2]  # the last layer's input
    layer = model.layers[-1]
    moe_in = layer.post_attention_layernorm(h + layer.self_attn(layer.input_layernorm(h)))
    _, indices, scores = layer.block_sparse_moe.route(moe_in.reshape(-1, moe_in.shape[-1]))
    experts, gates = rec.experts[-1][0], rec.gates[1][0]  # negative indices count from the end
    assert rec.layers == [1]
    with pytest.raises(KeyError, match="layer 0 was not captured"):
        rec.experts[0]
    assert np.array_equal(np.sort(np.array(experts), -1), np.sort(np.array(indices), -1))
    np.testing.assert_allclose(np.sort(np.array(gates), -1), np.sort(np.array(scores), -1), atol=1e-6)
    assert np.all(np.diff(np.array(gates), axis=-1) <= 0)  # best first


def test_capture_restores_the_model_even_after_an_error(tokenizer):
    model = tiny_model()
    layers = list(model.layers)
    with pytest.raises(ZeroDivisionError):
        with capture(model):
            assert model.layers[0] is not layers[0]
            1 / 0
    assert all(a is b for a, b in zip(model.layers, layers))
    assert all("qkv" not in vars(layer.self_attn) for layer in model.layers)
    with capture(model, what="hidden"):
        with pytest.raises(RuntimeError, match="nested"):
            with capture(model):
                pass
    with pytest.raises(ValueError, match="out of range"):
        with capture(model, layers=[2]):
            pass
    with pytest.raises(ValueError, match="choose from"):
        with capture(model, what=("routes",)):
            pass
    with capture(model, what="router") as rec:
        with pytest.raises(ValueError, match="nothing captured"):
            rec.router_logits
        model(ids(tokenizer))
        with pytest.raises(ValueError, match="attention was not captured"):
            rec.attention


@pytest.mark.parametrize("window", [None, 4])
def test_attention_rows_sum_to_one_are_causal_and_windowed(tokenizer, window):
    model = tiny_model(sliding_window=window)
    x = ids(tokenizer)
    with capture(model, what=("attention", "hidden")) as rec:
        model(x)
    T = x.shape[1]
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    hidden = (k > q) | ((q - k >= window) if window else False)
    for i, layer in enumerate(model.layers):
        a = np.array(rec.attention[i][0])  # (heads, T, T)
        assert a.shape == (model.args.num_attention_heads, T, T)
        np.testing.assert_allclose(a.sum(-1), 1, atol=1e-5)
        assert np.all(a[:, hidden] == 0) and np.all(a[:, ~hidden] > 0)
        # The weights are the ones the model uses: they reproduce the layer's attention output.
        h = layer.input_layernorm(rec.hidden_states[i])
        _, _, v, _ = layer.self_attn.qkv(h)
        v = mx.repeat(v, model.args.num_attention_heads // model.args.num_key_value_heads, axis=1)
        mixed = (rec.attention[i] @ v).transpose(0, 2, 1, 3).reshape(1, T, -1)
        np.testing.assert_allclose(np.array(layer.self_attn.o_proj(mixed)), np.array(layer.self_attn(h)), atol=1e-6)


@pytest.mark.parametrize("rolling", [False, True])
def test_capture_while_decoding_with_a_cache_equals_one_forward(tokenizer, rolling):
    """Prefill + one token at a time, through a full ring buffer: the same maps over positions."""
    model = tiny_model(sliding_window=5)
    x = ids(tokenizer)
    T = x.shape[1]
    with capture(model, what=("attention", "router")) as whole:
        model(x)
    cache = make_cache(model, rolling=rolling)
    with capture(model, what=("attention", "router")) as steps:
        model(x[:, :7], cache)
        for t in range(7, T):
            model(x[:, t : t + 1], cache)
    for i in range(len(model.layers)):
        assert steps.attention[i].shape == (1, model.args.num_attention_heads, T, T)
        np.testing.assert_allclose(np.array(steps.attention[i]), np.array(whole.attention[i]), atol=1e-6)
        np.testing.assert_allclose(np.array(steps.router_logits[i]), np.array(whole.router_logits[i]), atol=1e-5)


@pytest.mark.reference
def test_attention_and_router_logits_match_transformers(tmp_path, tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_model(sliding_window=6)
    directory = save(model, tokenizer, tmp_path / "m")
    hf = transformers.MixtralForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                         dtype=torch.float32).eval()
    x = ids(tokenizer)
    with torch.no_grad():
        ref = hf(torch.tensor(np.array(x)), output_attentions=True, output_router_logits=True)
    with capture(model, what=("attention", "router")) as rec:
        model(x)
    for i in range(len(model.layers)):
        np.testing.assert_allclose(np.array(rec.attention[i]), ref.attentions[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(rec.router_logits[i][0]), ref.router_logits[i].numpy(), atol=1e-4)


def test_attention_weights_group_query_heads_onto_their_key_head():
    q = mx.random.normal((1, 4, 3, 8), key=mx.random.key(0))
    k = mx.random.normal((1, 2, 3, 8), key=mx.random.key(1))
    w = np.array(attention_weights(q, k, "causal", 0.5))
    for head in range(4):
        scores = np.array(q[0, head] @ k[0, head // 2].T) * 0.5
        scores[np.triu_indices(3, 1)] = -np.inf
        want = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(w[0, head], want / want.sum(-1, keepdims=True), atol=1e-6)


# ---------------------------------------------------------------------- statistics
def hand_routing() -> Routing:
    """Six tokens in two windows of three, two layers, four experts, top-2."""
    experts = np.array([
        [[0, 1], [2, 3]],
        [[0, 2], [2, 3]],
        [[1, 0], [3, 2]],
        [[0, 1], [2, 3]],
        [[0, 1], [2, 3]],
        [[1, 2], [2, 3]],
    ])
    gates = np.tile([0.75, 0.25], (6, 2, 1))
    entropy = np.full((6, 2), 0.5)
    return Routing(experts, gates, entropy, np.array([1, 5, 6, 1, 5, 7]), np.array([0, 1, 2, 0, 1, 2]), 4)


def test_expert_statistics_on_a_hand_made_routing():
    stats = expert_statistics(hand_routing(), seed=0)
    first, second = stats["layers"]
    assert first["top1_share"] == pytest.approx([4 / 6, 2 / 6, 0, 0])
    assert first["topk_share"] == pytest.approx([5 / 12, 5 / 12, 2 / 12, 0])
    assert first["mean_gate"] == pytest.approx([(4 * 0.75 + 0.25) / 6, (2 * 0.75 + 3 * 0.25) / 6, 0.5 / 6, 0])
    assert first["mean_gate_when_chosen"][:3] == pytest.approx([0.65, 0.45, 0.25])
    assert first["mean_gate_when_chosen"][3] is None
    assert first["dead_experts"] == [3] and second["dead_experts"] == [0, 1]
    assert first["imbalance"] == pytest.approx(5 / 12 * 4)
    assert first["cv"] == pytest.approx(np.std([5, 5, 2, 0]) / np.mean([5, 5, 2, 0]))
    assert first["router_entropy"] == pytest.approx(0.5)
    # Pairs inside windows: (0,1) (1,2) (3,4) (4,5); first choices 0,0 | 0,1 | 0,0 | 0,1.
    c = first["consecutive"]
    assert c["pairs"] == 4 and c["same_top1"] == 0.5 and c["overlap_topk"] == 1.0
    assert second["consecutive"]["same_top1"] == 0.75
    for layer in stats["layers"]:
        for key in ("top1_share", "topk_share", "mean_gate"):
            assert sum(layer[key]) == pytest.approx(1)


def test_breakdowns_by_token_kind_and_position():
    kinds = np.zeros(8, dtype=np.int64)
    kinds[[5, 6, 7]] = 2  # "word piece"; id 1 stays 0 ("special")
    stats = expert_statistics(hand_routing(), token_kind=kinds, seq_len=3)
    by_kind = stats["by_kind"]
    assert by_kind["groups"] == ["special", "word piece"] and by_kind["tokens"] == [2, 4]
    assert by_kind["topk_share"][0][0] == pytest.approx([0.5, 0.5, 0, 0])  # ids 1: [0,1] twice
    assert by_kind["topk_share"][0][1] == pytest.approx([3 / 8, 3 / 8, 2 / 8, 0])  # [0,2] [1,0] [0,1] [1,2]
    by_position = stats["by_position"]
    assert by_position["groups"] == ["0", "1", "2"] and by_position["tokens"] == [2, 2, 2]
    assert by_position["topk_share"][1][2] == pytest.approx([0, 0, 0.5, 0.5])


def test_uniform_rates():
    assert uniform_rates(8, 2) == pytest.approx({"share": 0.125, "same_top1": 0.125, "overlap_topk": 1 - 15 / 28})


def test_token_windows_cover_the_whole_split():
    stream = np.arange(1000)
    assert np.array_equal(np.concatenate(token_windows(stream, max_tokens=5000, seq_len=64)), stream)
    sample = token_windows(stream, max_tokens=200, seq_len=50)
    assert [len(w) for w in sample] == [50] * 4
    assert sample[0][0] == 0 and sample[-1][-1] == 999  # from the first token to the last


# ---------------------------------------------------------------------- commands
def test_analyze_experts(tmp_path, model_dir, data_dirs):
    r = cli("analyze", "experts", "--model", model_dir, "--data", f"prose={data_dirs['prose']}", data_dirs["chat"],
            "--seq-len", 32, "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "experts.json").read_text())
    assert list(report["data_sets"]) == ["prose", "chat", "all"]
    for name in ("prose", "chat", "all"):
        data = report["data_sets"][name]
        assert len(data["layers"]) == 2 and data["tokens"] > 0
        for layer in data["layers"]:
            assert sum(layer["top1_share"]) == pytest.approx(1, abs=1e-12)
            assert sum(layer["topk_share"]) == pytest.approx(1, abs=1e-12)
            assert sum(layer["mean_gate"]) == pytest.approx(1, abs=1e-6)  # float32 gates
        for share in data["by_kind"]["topk_share"][0]:
            assert sum(share) == pytest.approx(1)
    assert len(report["total_variation"]["prose vs chat"]) == 2
    for png in ("experts_share", "experts_diff", "experts_first_last", "experts_by_token"):
        assert_png(tmp_path / "out" / f"{png}.png")
    assert "prose:" in r.stdout and "chat:" in r.stdout and "total variation" in r.stdout


def test_analyze_experts_and_routes_report_hand_set_routes(tmp_path, routed_model_dir, data_dirs, tokenizer):
    r = cli("analyze", "experts", "--model", routed_model_dir, "--data", data_dirs["prose"], "--seq-len", 16,
            "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "experts.json").read_text())["data_sets"]["prose"]
    tokens = np.asarray(tokenize_split(data_dirs["prose"], "val", tokenizer).tokens, dtype=np.int64)
    assert report["tokens"] == len(tokens)
    for layer, stats in enumerate(report["layers"]):
        chosen = np.array([designed_experts(t, layer) for t in tokens])
        assert stats["top1_share"] == pytest.approx(np.bincount(chosen[:, 0], minlength=4) / len(tokens), abs=1e-12)
        assert stats["topk_share"] == pytest.approx(np.bincount(chosen.ravel(), minlength=4) / chosen.size, abs=1e-12)
        within = np.arange(1, len(tokens))[np.arange(1, len(tokens)) % 16 != 0]
        assert stats["consecutive"]["same_top1"] == pytest.approx(np.mean(chosen[within, 0] == chosen[within - 1, 0]))
        for expert, top in enumerate(stats["top_tokens"]):
            assert all(designed_experts(t["id"], layer)[0] == expert and t["share"] == 1 for t in top)

    prompt = "The dog sleeps in the sun."
    r = cli("analyze", "routes", "--model", routed_model_dir, "--prompt", prompt, "--out", "routes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    routes = json.loads((tmp_path / "routes" / "routes.json").read_text())
    assert routes["ids"] == tokenizer.encode(prompt, bos=True)
    for layer in range(2):
        assert routes["experts"][layer] == [designed_experts(t, layer) for t in routes["ids"]]
    # Logits 2 and 1 over the norm of (2, 1) in 64 dimensions: the first gate is sigmoid(8 / sqrt(5)).
    np.testing.assert_allclose(np.array(routes["gates"])[..., 0], 1 / (1 + np.exp(-8 / np.sqrt(5))), atol=1e-4)
    assert_png(tmp_path / "routes" / "routes.png")
    assert "layer 0" in r.stdout and "\x1b[" not in r.stdout  # not a terminal: a plain table


def test_routes_print_each_token_on_its_experts_colour(capsys):
    from mixtral_mlx.analysis_plots import expert_colours
    from mixtral_mlx.cli.analyze import print_coloured_routes

    print_coloured_routes(["A", "b"], np.array([[[0, 1], [2, 0]]]), 4)
    line = capsys.readouterr().out.splitlines()[1]
    for text, expert in (("A", 0), ("b", 2)):
        r, g, b, _ = (round(255 * c) for c in expert_colours(4)(expert))
        assert f"48;2;{r};{g};{b}m{text}\x1b[0m" in line


def test_analyze_attention(tmp_path, model_dir, tokenizer):
    prompt = "The cat watches the bird."
    r = cli("analyze", "attention", "--model", model_dir, "--prompt", prompt, "--out", "att", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "att" / "attention.json").read_text())
    T = len(tokenizer.encode(prompt, bos=True))
    assert report["heads"] == [0, 1, 2, 3] and len(report["tokens"]) == T
    assert set(report["layers"]) == {"0", "1"} and len(report["layers"]["1"]["entropy"]) == 4
    maps = np.load(tmp_path / "att" / "attention.npz")
    assert maps["layer_1"].shape == (4, T, T)
    np.testing.assert_allclose(maps["layer_1"].sum(-1), 1, atol=1e-5)
    for layer in (0, 1):
        assert_png(tmp_path / "att" / f"attention_layer{layer}.png")
    r = cli("analyze", "attention", "--model", model_dir, "--prompt", prompt, "--out", "one", "--layer", -1,
            "--head", 3, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_png(tmp_path / "one" / "attention_layer1_head3.png")
    assert np.load(tmp_path / "one" / "attention.npz")["layer_1"].shape == (1, T, T)


def test_analyze_hidden(tmp_path, model_dir):
    prompt = "Rain fell all night."
    r = cli("analyze", "hidden", "--model", model_dir, "--prompt", prompt, "--out", "h/states.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = np.load(tmp_path / "h" / "states.npz")
    model, tokenizer = mixtral_mlx.load(model_dir)
    want = model.forward(ids(tokenizer, prompt), hidden_states=True).hidden_states
    assert saved["hidden_states"].shape == (3, len(saved["ids"]), 64)
    np.testing.assert_allclose(saved["hidden_states"], np.stack([np.array(h[0]) for h in want]), atol=1e-6)
    report = json.loads((tmp_path / "h" / "states.json").read_text())
    assert len(report["norms"]) == 3 and len(report["cosine_to_previous"]) == 2
    assert_png(tmp_path / "h" / "states.png")
    assert "embeddings" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["experts", "--data", "missing"], "missing: no such data directory"),
    (["experts", "--data", "."], "val.jsonl: no such file (or valid.jsonl)"),
    (["experts", "--data", "a=", "--out", "out"], "--data: 'a=' is not NAME=DIR"),
    (["experts", "--data", "all=."], "--data: 'all' names the data sets pooled"),
    (["experts", "--data", "x", "--max-tokens", "0"], "--max-tokens: must be a positive integer"),
    (["attention", "--prompt", "hi", "--layer", "2"], "--layer: 2 is out of range: the model has 2 layers"),
    (["attention", "--prompt", "hi", "--head", "-5"], "--head: -5 is out of range"),
    (["routes", "--prompt", ""], "--prompt: is empty"),
    (["hidden", "--prompt", "hi", "--out", "h.txt"], "--out: must name a .npz file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, model_dir, argv, message):
    assert_user_error(cli("analyze", argv[0], "--model", model_dir, *argv[1:], cwd=tmp_path), message)
    assert list(tmp_path.iterdir()) == []


def test_adapter_flag(tmp_path, model_dir):
    r = cli("analyze", "routes", "--model", model_dir, "--adapter", tmp_path / "no-such-adapter", "--prompt", "hi",
            cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    if importlib.util.find_spec("mixtral_mlx.lora") is None:
        assert "--adapter: adapters are not available" in r.stderr


def test_analyze_experts_on_public_data_sets(tmp_path, model_dir, shared_data):
    r = cli("analyze", "experts", "--model", model_dir, "--data", f"wiki={shared_data / 'wikitext-2-raw'}",
            f"shakespeare={shared_data / 'tinyshakespeare'}", "--max-tokens", 1024, "--seq-len", 128,
            "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "experts.json").read_text())
    assert [report["data_sets"][n]["tokens"] for n in ("wiki", "shakespeare")] == [1024, 1024]
