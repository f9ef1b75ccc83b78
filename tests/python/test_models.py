"""flashlin.models (LanguageModel: cache, padding, packing, gradients, generate, checkpoints) and
the example programs (python -m flashlin demo / recall), with tiny settings."""
import copy
import importlib.util
import io
import json
import os

import pytest
import torch

import flashlin
from flashlin import demo, recall
from flashlin.__main__ import main as flashlin_main
from flashlin.models import MIXERS, LanguageModel, LMConfig, sample_next_token

RTOL = 1e-4
VOCAB = 40

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and flashlin.has_cuda()),
                                reason="needs a CUDA device and a CUDA build of libflashlin")


def make(mixer, tie=True, short_conv=False, layers=2, spread=0.3):
    """A tiny model whose parameters are spread out (so that logits differ clearly)."""
    extra = {"proj_low_rank_dim": 4, "gate_low_rank_dim": 8} if mixer == "rwkv6" else {}
    config = LMConfig(vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=2,
                      mixer=mixer, mlp_ratio=2, tie_word_embeddings=tie,
                      use_short_conv=short_conv, mixer_kwargs=extra)
    model = LanguageModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(spread * torch.randn_like(p))
    return model.eval()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_matches_full_forward(mixer):
    model = make(mixer, short_conv=True)
    ids = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :66], use_cache=True)
        pieces = [logits]
        for t in range(66, 70):
            logits, cache = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            pieces.append(logits)
    assert full.shape == (2, 70, VOCAB)
    assert rel(torch.cat(pieces, 1), full) < RTOL
    assert rel(torch.cat(pieces, 1)[:, -1], full[:, -1]) < RTOL


@pytest.mark.parametrize("mixer", MIXERS)
def test_left_padded_batch_equals_separate_runs(mixer):
    model = make(mixer)
    lengths, T = [12, 5, 1], 12
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    ids = torch.randint(0, VOCAB, (3, T))  # random tokens under the padding
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = seqs[b][0]
        mask[b, T - n:] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for b, n in enumerate(lengths):
            assert rel(batch[b, T - n:], model(seqs[b])[0]) < RTOL, b


@pytest.mark.parametrize("mixer", MIXERS)
def test_cu_seqlens_equals_separate_runs(mixer):
    model = make(mixer, short_conv=True)
    lengths = [7, 1, 20]
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu)
        start = 0
        for s, n in zip(seqs, lengths):
            assert rel(packed[0, start:start + n], model(s)[0]) < RTOL
            start += n


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer):
    model = make(mixer, tie=False, short_conv=True).train()
    ids = torch.randint(0, VOCAB, (2, 24))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.startswith("embeddings"):
            assert p.grad.abs().sum() > 0  # only the rows of tokens that occur
        else:
            assert p.grad.abs().sum() > 0, name


def test_training_steps_lower_the_loss():
    model = make("gla", spread=0.0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.arange(24).repeat(2, 2) % VOCAB  # a pattern to memorise
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- generation -----------------------------------------------------------------------------------
def _greedy_by_full_forwards(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_greedy_equals_repeated_full_forwards(mixer):
    model = make(mixer, short_conv=True, spread=0.5)
    prompt = torch.randint(0, VOCAB, (2, 6))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    assert torch.equal(out, _greedy_by_full_forwards(model, prompt, 8))
    assert len(set(out[:, 6:].flatten().tolist())) > 1  # not a degenerate model


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_left_padded_batch(mixer):
    model = make(mixer, spread=0.5)
    prompts = [torch.randint(0, VOCAB, (1, n)) for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 7 - p.shape[1]:] = p[0]
        mask[b, 7 - p.shape[1]:] = 1
    out = model.generate(ids, 6, attention_mask=mask)
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, 7:], model.generate(p, 6)[0, p.shape[1]:]), b
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, 2, attention_mask=mask.flip(1))


def test_generate_sampling():
    model = make("gla", spread=0.5)
    prompt = torch.randint(0, VOCAB, (3, 5))
    greedy = model.generate(prompt, 6)
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_p=1e-6), greedy)
    a = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    eos = int(greedy[0, 6])
    stopped = model.generate(prompt[:1], 6, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]]).repeat(500, 1)
    top2 = sample_next_token(logits, 1.0, top_k=2)
    assert set(top2.tolist()) == {1, 2}
    probs = logits[0].softmax(-1)  # top_p = 0.8 keeps tokens 1 and 2 (0.665 + 0.245)
    assert probs[1] < 0.8 < probs[1] + probs[2]
    assert set(sample_next_token(logits, 1.0, top_p=0.8).tolist()) == {1, 2}
    assert sample_next_token(logits, 0.0).tolist() == [1] * 500


# --- checkpoints and configuration ----------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    model = make("retention", tie=tie)
    path = model.save_pretrained(str(tmp_path / "ckpt"))
    assert os.path.exists(path)
    loaded = LanguageModel.from_pretrained(str(tmp_path / "ckpt"))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embeddings.weight) == tie
    with open(tmp_path / "ckpt" / "config.json") as f:
        assert json.load(f)["mixer"] == "retention"


def test_torch_checkpoint_format_and_plain_state_dict(tmp_path):
    model = make("rwkv6")
    path = model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert path.endswith("pytorch_model.bin")
    loaded = LanguageModel.from_pretrained(str(tmp_path))
    other = LanguageModel(model.config)
    other.load_state_dict(model.state_dict())  # plain state dicts work too
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids)) and torch.equal(model(ids), other(ids))


def test_config():
    config = LMConfig(mixer="lightning", hidden_size=48, mlp_ratio=4)
    assert LMConfig.from_json(config.to_json()) == config
    assert config.mlp_size % 32 == 0 and config.mlp_size >= 48 * 4 * 2 // 3
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(mixer="transformer")
    with pytest.raises(ValueError, match="unknown keys"):
        LMConfig.from_dict({"mixer": "gla", "bogus": 1})


# --- CUDA -----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("mixer", MIXERS)
def test_cuda_model_matches_cpu(mixer):
    model = make(mixer, short_conv=True, spread=0.5)
    gpu = copy.deepcopy(model).cuda()
    ids = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        assert rel(gpu(ids.cuda()).cpu(), model(ids)) < RTOL
    out = gpu.generate(ids[:, :5].cuda(), 6)
    assert torch.equal(out.cpu(), model.generate(ids[:, :5], 6))


@needs_cuda
def test_cuda_trained_checkpoint_loads_on_cpu(tmp_path):
    gpu = make("gla", short_conv=True).cuda()
    ids = torch.randint(0, VOCAB, (2, 70), device="cuda")
    optimizer = torch.optim.SGD(gpu.parameters(), lr=0.1)
    for _ in range(2):  # train on the GPU so the weights are the GPU's own
        logits = gpu(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gpu.save_pretrained(str(tmp_path / "ckpt"))
    cpu = LanguageModel.from_pretrained(str(tmp_path / "ckpt"), map_location="cpu")
    with torch.no_grad():
        assert rel(cpu(ids.cpu()), gpu(ids).cpu()) < RTOL


# --- the example programs -------------------------------------------------------------------------
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    flashlin_main(["demo", "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--layers",
                   "1", "--hidden", "32", "--heads", "2", "--sample-tokens", "5",
                   "--eval-batches", "1", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "unigram entropy" in printed and "held-out loss" in printed
    assert "step 3/3" in printed  # not a terminal: plain lines
    assert os.path.exists(out / "checkpoint" / "config.json")
    model = LanguageModel.from_pretrained(str(out / "checkpoint"))
    assert model.config.hidden_size == 32 and model.config.mixer == "gla"
    if importlib.util.find_spec("matplotlib") is None:  # scripts/setup.sh installs it
        assert not (out / "loss.png").exists()
    else:
        with open(out / "loss.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "losses.csv").read_text().count("\n") == 4


def test_demo_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 200)
    result = demo.run(demo.build_parser().parse_args(
        ["--text", str(text), "--mixer", "rwkv6", "--steps", "2", "--seq-len", "8",
         "--batch-size", "2", "--layers", "1", "--hidden", "32", "--heads", "2",
         "--sample-tokens", "3", "--eval-batches", "1", "--device", "cpu", "--out",
         str(tmp_path / "o"), "--prompt", "the "]))
    train, _ = demo.split_corpus(torch.tensor(list(text.read_bytes())))
    assert result["unigram_entropy"] == pytest.approx(demo.unigram_entropy(train))
    assert result["sample"].startswith("the ") and len(result["losses"]) == 2


def test_split_corpus():
    tokens = torch.arange(1_000_000)
    train, held = demo.split_corpus(tokens)
    assert train.numel() + held.numel() == 1_000_000
    assert torch.equal(torch.cat([train, held]).sort().values, tokens)
    assert 0.08 < held.numel() / 1e6 < 0.12 and held.max() > 900_000 and held.min() < 25_000


def test_unigram_entropy():
    assert demo.unigram_entropy(torch.tensor([1, 2, 3, 4])) == pytest.approx(
        float(torch.log(torch.tensor(4.0))))
    assert demo.unigram_entropy(torch.tensor([5, 5, 5])) == pytest.approx(0.0)


def test_progress_line_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    stream = Terminal()
    progress = demo.Progress(10, 5, stream)
    for step in range(1, 11):
        progress.update(step, f"loss {1.0 / step:.3f}")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 10 and text.count("\n") == 1 and "step 10/10" in text
    plain = io.StringIO()
    progress = demo.Progress(10, 5, plain)
    for step in range(1, 11):
        progress.update(step, "x")
    assert plain.getvalue().splitlines() == ["step  5/10  x", "step 10/10  x"]


@needs_cuda
def test_demo_on_cuda(tmp_path):
    result = demo.run(demo.build_parser().parse_args(
        ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--layers", "1", "--hidden",
         "32", "--heads", "2", "--sample-tokens", "4", "--eval-batches", "1", "--device", "cuda",
         "--out", str(tmp_path)]))
    assert len(result["losses"]) == 3 and (tmp_path / "checkpoint" / "config.json").exists()


def test_unknown_mixer_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        flashlin_main(["demo", "--mixer", "mamba"])
    assert exit_info.value.code == 2
    assert "unknown mixer 'mamba'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flashlin_main(["recall", "--mixers", "gla,mamba"])
    with pytest.raises(ValueError, match="unknown mixer"):
        LMConfig(mixer="mamba")


def test_mqar_batches():
    gen = torch.Generator().manual_seed(0)
    x, y, mask = recall.mqar_batch(4, 5, 3, 16, 10, gen)
    assert x.shape == y.shape == mask.shape == (4, 2 * (5 + 3) - 1)
    assert int(mask.sum()) == 4 * 3
    for b in range(4):
        pairs = dict(zip(x[b, 0:10:2].tolist(), x[b, 1:10:2].tolist()))
        assert len(pairs) == 5 and all(1 <= k <= 16 for k in pairs)
        assert all(17 <= v <= 26 for v in pairs.values())
        for pos in mask[b].nonzero().flatten().tolist():
            assert pairs[int(x[b, pos])] == int(y[b, pos])  # the answer is the key's value


def test_recall_tiny(capsys):
    results = recall.run(recall.build_parser().parse_args(
        ["--mixers", "gla,rwkv6", "--steps", "3", "--batch-size", "4", "--pairs", "4",
         "--queries", "2", "--num-keys", "8", "--num-values", "8", "--hidden", "16",
         "--heads", "2", "--layers", "1", "--eval-batches", "1", "--device", "cpu"]))
    assert [r["mixer"] for r in results] == ["gla", "rwkv6"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state"] == 2 * 8 * 8 for r in results)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "rwkv6" in printed
