"""Export of the boosted fine-tune as a peft LoRA adapter, SVD truncation, unmerge, CLI."""

import copy
import json
import re

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
)

import xgblora_fast as xf
from xgblora_fast.boosting.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPORT_REPORT,
    adapter_metadata,
)
from xgblora_fast.boosting.export import export_lora_from_checkpoint as export_from_checkpoint
from xgblora_fast.boosting.records import MergeRecord
from xgblora_fast.cli import main as cli

VOCAB = 40


def tiny_bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=24,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).to(dtype).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=24)
    return GPT2LMHeadModel(cfg).eval()


def batch(g, n=8):
    ids = torch.randint(0, VOCAB, (n, 10), generator=g)
    return ids, ids[:, 0] % 3  # a learnable label


def boost(model, steps=40, lr=2e-2, rounding="nearest", head=True, finish=True, **config):
    """A short XGBLoRA run (2-step rounds, 2 modules a round); the head trains fully."""
    cfg = xf.XGBLoRAConfig(
        **{
            "target_modules": ["query", "value", "output.dense"],
            "kappa": 2,
            "kappa_growth": 1.0,
            "layers_per_round": 2,
            "sample_by": "module",
            "rounding": rounding,
            "seed": 3,
        }
        | config
    )
    booster = xf.Booster(model, cfg)
    groups = booster.param_groups(lr=lr)
    if head:
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(model.classifier.parameters()), "lr": 1e-2})
    optimizer = torch.optim.AdamW(groups)
    booster.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids, labels = batch(g)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    if finish:
        booster.finish()
    model.eval()
    return booster, optimizer


@pytest.fixture(scope="module")
def boosted():
    """A tiny BERT classifier after 20 rounds (fp32), kept pristine: tests work on copies."""
    model = tiny_bert()
    booster, _ = boost(model)
    return booster


@pytest.fixture(scope="module")
def boosted_bf16():
    """bf16 weights after 30 one-step rounds of all 8 layers, merges rounded to nearest."""
    model = tiny_bert(torch.bfloat16)
    booster, _ = boost(
        model, steps=30, lr=3e-2, kappa=1, kappa_growth=1.0, layers_per_round=8, head=False
    )
    return booster


def copy_booster(booster):
    return copy.deepcopy(booster)  # model, layers and records stay linked inside the copy


IDS = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def logits(model, ids=IDS):
    return model(input_ids=ids).logits.double()


def rel(x, y):
    return float((x - y).norm() / y.norm())


def load_peft(base, path):
    return peft.PeftModel.from_pretrained(base, str(path)).eval()


def adapter_tensors(path):
    with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)


def configured_rank(config, name):
    """``(r, lora_alpha)`` that peft gives module ``name`` (pattern keys are escaped names)."""
    key = re.escape(name)
    return (
        config["rank_pattern"].get(key, config["r"]),
        config["alpha_pattern"].get(key, config["lora_alpha"]),
    )


def ranks_from_history(booster):
    counts = {}
    for h in booster.history:
        for name in h["active"]:
            counts[name] = counts.get(name, 0) + 1
    return counts


# ------------------------------------------------------------------ export
def test_peft_loads_the_adapter_and_reproduces_the_fine_tune(boosted, tmp_path):
    report = xf.export_lora(boosted, tmp_path)
    merged = logits(boosted.model)
    assert rel(merged, logits(tiny_bert())) > 1e-2  # the fine-tune changed the model
    assert rel(logits(load_peft(tiny_bert(), tmp_path)), merged) < 1e-5
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"] == report["modules_to_save"]
    # The same files as peft's own save_pretrained of this configuration, key for key.
    reference = peft.get_peft_model(tiny_bert(), peft.LoraConfig.from_pretrained(str(tmp_path)))
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = adapter_tensors(tmp_path), adapter_tensors(tmp_path / "reference")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.items()
    }
    assert "base_model.model.classifier.weight" in ours
    assert json.loads((tmp_path / EXPORT_REPORT).read_text()) == report


def test_rank_pattern_follows_the_rounds_each_layer_was_active(boosted, tmp_path):
    xf.export_lora(boosted, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    active = ranks_from_history(boosted)
    assert len(set(active.values())) > 1  # layers were active different numbers of rounds
    assert set(config["target_modules"]) == set(active)  # never-active layers get no entry
    tensors = adapter_tensors(tmp_path)
    for name, rounds in active.items():
        assert configured_rank(config, name) == (rounds, rounds), name  # peft's scaling: 1
        layer = boosted.layers[name]
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (rounds, layer.in_features)
        assert b.shape == (layer.out_features, rounds)


def test_svd_truncation_error_grows_as_rank_shrinks(boosted, tmp_path):
    merged = logits(boosted.model)
    xf.export_lora(boosted, tmp_path)
    exact = adapter_tensors(tmp_path)
    full = max(ranks_from_history(boosted).values())
    errors, changes = [], []
    for rank in (full, 6, 3, 1):
        path = tmp_path / f"r{rank}"
        report = xf.export_lora(boosted, path, rank=rank)
        assert json.loads((path / EXPORT_REPORT).read_text())["relative_error"] == pytest.approx(
            report["relative_error"]
        )
        assert max(layer["rank"] for layer in report["layers"].values()) == rank
        errors.append(report["relative_error"])
        changes.append(rel(logits(load_peft(tiny_bert(), path)), merged))
    assert errors[0] == 0.0  # full rank: the exact adapter, tensor for tensor
    full_tensors = adapter_tensors(tmp_path / f"r{full}")
    assert full_tensors.keys() == exact.keys()
    assert all(torch.equal(full_tensors[k], v) for k, v in exact.items())
    assert errors == sorted(errors) and len(set(errors)) == 4
    assert changes == sorted(changes) and changes[-1] > 10 * changes[0]
    # The reported per-layer error is the true one, measured on the dense update.
    report = json.loads((tmp_path / "r3" / EXPORT_REPORT).read_text())
    tensors = adapter_tensors(tmp_path / "r3")
    for name, layer in report["layers"].items():
        up, down = boosted.records[name].factors()
        delta = up.double() @ down.double()
        key = f"base_model.model.{name}.lora_"
        approx = tensors[key + "B.weight"].double() @ tensors[key + "A.weight"].double()
        assert rel(approx, delta) == pytest.approx(layer["relative_error"], abs=1e-6)


def test_bf16_adapter_is_closer_to_the_float64_truth_than_merged_weights(boosted_bf16, tmp_path):
    booster, model = boosted_bf16, boosted_bf16.model
    xf.export_lora(booster, tmp_path)
    # Truth: the bf16 base weights plus every recorded update, in float64.
    truth = tiny_bert(torch.bfloat16).double()
    state = truth.state_dict()
    for name, record in booster.records.items():
        up, down = record.factors()
        state[name + ".weight"] += up.double() @ down.double()
    truth.load_state_dict(state)
    want = logits(truth)
    adapter = load_peft(tiny_bert(torch.bfloat16), tmp_path)
    # In float64 arithmetic on the stored weights, only representation errors remain: the
    # adapter keeps the update in fp32 next to the bf16 base, the merges rounded it into bf16.
    merged64_err = rel(logits(copy.deepcopy(model).double()), want)
    adapter64_err = rel(logits(copy.deepcopy(adapter).double()), want)
    # In bf16 arithmetic both are at bf16 noise (~1e-2), far below the fine-tune's effect.
    base_err = rel(logits(tiny_bert(torch.bfloat16)), want)
    merged_err, adapter_err = rel(logits(model), want), rel(logits(adapter), want)
    print(
        f"\nbf16 weights, rel. logits error vs float64 truth: fp64 arithmetic: merged "
        f"{merged64_err:.1e}, adapter {adapter64_err:.1e}; bf16 arithmetic: merged "
        f"{merged_err:.1e}, adapter {adapter_err:.1e} (fine-tune's effect {base_err:.1e})"
    )
    assert adapter64_err < 1e-6 and merged64_err > 1e-5
    assert adapter_err < 0.5 * base_err


def test_gpt2_conv1d_layers_export_with_fan_in_fan_out(tmp_path):
    model = tiny_gpt2()
    cfg = xf.XGBLoRAConfig(
        target_modules=["c_attn", "c_fc"], kappa=2, kappa_growth=1.0, layers_per_round=1
    )
    booster = xf.Booster(model, cfg)
    optimizer = torch.optim.AdamW(booster.param_groups(lr=2e-2))
    booster.attach(optimizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        ids, _ = batch(g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        booster.step(loss.item())
    booster.finish()
    xf.export_lora(booster, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] and config["task_type"] == "CAUSAL_LM"
    assert config["modules_to_save"] is None
    merged = logits(model)
    assert rel(merged, logits(tiny_gpt2())) > 1e-3
    assert rel(logits(load_peft(tiny_gpt2(), tmp_path)), merged) < 1e-5


# ------------------------------------------------------------------ unmerge
def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora" not in k}


def test_unmerge_all_rounds_restores_the_original_fp32_weights(boosted):
    booster = copy_booster(boosted)
    original = weights(tiny_bert())
    merged = weights(booster.model)
    removed = xf.unmerge_(booster)
    assert removed == sorted({t for r in boosted.records.values() for t in r.rounds})
    restored = weights(booster.model)
    for name in ranks_from_history(boosted):
        key = name + ".weight"
        change = (merged[key] - original[key]).abs().max()
        assert change > 1e-3, key
        torch.testing.assert_close(restored[key], original[key], rtol=0, atol=1e-6)
    assert not any(r.rounds for r in booster.records.values())
    with pytest.raises(ValueError, match="nothing recorded"):
        xf.export_lora(booster, "unused")


def test_unmerge_all_rounds_of_bf16_weights_is_within_rounding(boosted_bf16):
    booster = copy_booster(boosted_bf16)
    model = booster.model
    original = weights(tiny_bert(torch.bfloat16))
    merged = weights(model)
    factors = {n: r.factors() for n, r in booster.records.items() if r.rounds}
    xf.unmerge_(model)  # the model alone: its layers carry the records
    restored = weights(model)
    for name, (up, down) in factors.items():
        key = name + ".weight"
        w0, w1, w2 = (w[key].double() for w in (original, merged, restored))
        # Every merge and unmerge rounds once, to at most half an ulp of bf16 (8 significant
        # bits) of a value no larger than |W_0| + sum_t |update_t|.
        largest = w0.abs() + up.double().abs() @ down.double().abs()
        bound = 2 * up.shape[1] * 2**-8 * largest
        error, moved = float(((w2 - w0).abs() / bound).max()), float((w1 - w0).abs().max())
        print(f"{name}: {up.shape[1]} rounds, error {error:.2f} of the bound")
        assert moved > 20 * float((w2 - w0).abs().max()), key
        assert error <= 1, key


def test_unmerge_goes_through_the_kahan_compensation():
    model = tiny_bert(torch.bfloat16)
    booster, _ = boost(
        model, steps=8, lr=3e-2, kappa=1, kappa_growth=1.0, layers_per_round=8, rounding="kahan"
    )
    original = weights(tiny_bert(torch.bfloat16))
    xf.unmerge_(booster)
    restored = weights(model)
    for name in booster.layers:
        key = name + ".weight"
        assert booster.layers[name].compensation is not None
        # Compensated un-merges land back on the original bf16 values almost everywhere
        # (round-to-nearest un-merges leave about half of them off by an ulp or more).
        same = (restored[key] == original[key]).float().mean()
        assert same > 0.98, key
        torch.testing.assert_close(restored[key], original[key], rtol=0, atol=1e-5)


def test_unmerge_one_round_equals_replaying_the_others(boosted, tmp_path):
    booster = copy_booster(boosted)
    target = boosted.history[3]["round"]
    assert xf.unmerge_(booster, rounds=target) == [target]
    # Replay every other recorded merge onto the original weights, in order.
    replay = tiny_bert()
    for name, record in boosted.records.items():
        weight = replay.get_submodule(name).weight
        for t, step, a, b in zip(record.rounds, record.steps, record.a, record.b, strict=True):
            if t != target:
                xf.merge_(weight, a, b, step * record.alpha, "nearest")
    for name, record in booster.records.items():
        assert target not in record.rounds
        torch.testing.assert_close(
            booster.layers[name].weight, replay.get_submodule(name).weight, rtol=0, atol=1e-6
        )
    touched = set(boosted.history[3]["active"])
    for name in touched:  # the round did contribute
        change = booster.layers[name].weight - boosted.layers[name].weight
        assert change.abs().max() > 1e-4, name
    # The adapter of what is left reproduces the model without that round.
    xf.export_lora(booster, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    for name in touched:
        assert configured_rank(config, name)[0] == len(boosted.records[name].rounds) - 1
    assert rel(logits(load_peft(tiny_bert(), tmp_path)), logits(booster.model)) < 1e-5


def test_unmerge_refuses_unknown_rounds_and_changes_nothing(boosted):
    booster = copy_booster(boosted)
    before = weights(booster.model)
    with pytest.raises(ValueError, match=r"rounds \[999\] were never recorded"):
        xf.unmerge_(booster, rounds=[0, 999])
    after = weights(booster.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [r.rounds for r in booster.records.values()] == [
        r.rounds for r in boosted.records.values()
    ]


def test_nothing_recorded_is_a_clear_error(boosted, tmp_path):
    model = tiny_bert()
    booster, _ = boost(model, steps=4, record=False)
    assert booster.history  # rounds were merged, just not recorded
    with pytest.raises(ValueError, match="nothing recorded"):
        xf.export_lora(booster, tmp_path)
    with pytest.raises(ValueError, match="nothing recorded"):
        xf.unmerge_(model)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        xf.export_lora(boosted, tmp_path, rank=0)


# ------------------------------------------------------------------ checkpoints and CLI
def test_records_survive_a_checkpoint(boosted, tmp_path):
    booster = copy_booster(boosted)
    xf.save_checkpoint(
        tmp_path / "run",
        booster.model,
        booster,
        extra={"lora_export": adapter_metadata(booster.model)},
    )
    fresh = xf.Booster(tiny_bert(), booster.config)
    assert not any(r.rounds for r in fresh.records.values())
    xf.load_checkpoint(tmp_path / "run", fresh.model, fresh)
    for name, record in booster.records.items():
        loaded = fresh.records[name]
        assert loaded.rounds == record.rounds and loaded.steps == record.steps
        assert all(torch.equal(x, y) for x, y in zip(loaded.a, record.a, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(loaded.b, record.b, strict=True))
        assert fresh.layers[name].merge_record is loaded  # the layer sees the loaded record
    # From the loaded booster and straight from the checkpoint folder: the same adapter.
    xf.export_lora(booster, tmp_path / "memory")
    export_from_checkpoint(tmp_path / "run", tmp_path / "folder")
    ours, theirs = adapter_tensors(tmp_path / "memory"), adapter_tensors(tmp_path / "folder")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # A record that does not fit the model is refused before anything changes.
    state = booster.state_dict()
    name = next(iter(state["records"]))
    state["records"][name]["a"] = state["records"][name]["a"][:, :5]
    with pytest.raises(ValueError, match="merge record"):
        fresh.load_state_dict(state)
    assert fresh.records[name].rounds == booster.records[name].rounds


@pytest.mark.parametrize("steps", [4, 5])
def test_exports_include_the_boosters_not_yet_merged(tmp_path, steps):
    """What booster_keep left in place (4 steps of 2-step rounds: a round boundary), or a round
    in progress (5 steps), is in the adapter: from the live booster and from a checkpoint it
    is the adapter that finish() then gives, and peft reproduces the unfinished model."""
    kept = {"layers_per_round": 1.0, "booster_init": "carry", "booster_keep": 0.5}
    booster, _ = boost(tiny_bert(), steps=steps, finish=False, **kept)
    assert booster.step_in_round == steps % 2
    assert all(bool(booster.layers[n].lora_b.any()) for n in booster.active)
    model = booster.model
    unfinished = logits(model)
    xf.save_checkpoint(
        tmp_path / "ckpt", model, booster, extra={"lora_export": adapter_metadata(model)}
    )
    records_before = {n: list(r.rounds) for n, r in booster.records.items()}
    xf.export_lora(booster, tmp_path / "live")
    assert {n: list(r.rounds) for n, r in booster.records.items()} == records_before  # copies
    export_from_checkpoint(tmp_path / "ckpt", tmp_path / "from_ckpt")
    booster.finish()
    torch.testing.assert_close(logits(model), unfinished, rtol=1e-5, atol=1e-6)
    xf.export_lora(booster, tmp_path / "finished")
    finished = adapter_tensors(tmp_path / "finished")
    for name in ("live", "from_ckpt"):
        ours = adapter_tensors(tmp_path / name)
        assert ours.keys() == finished.keys(), name
        assert all(torch.equal(ours[k], finished[k]) for k in ours), name
    assert rel(logits(load_peft(tiny_bert(), tmp_path / "from_ckpt")), unfinished) < 1e-5


def test_cli_finetune_and_export_lora_end_to_end(tiny_folder, sentiment_csv, tmp_path):
    run = tmp_path / "run"
    common = ["--model", str(tiny_folder / "bert"), "--data", str(sentiment_csv)]
    argv = [
        "finetune",
        *common,
        "--output",
        str(run),
        "--steps",
        "8",
        "--kappa",
        "2",
        "--kappa-growth",
        "1",
    ]
    argv += ["--batch-size", "8", "--eval-every", "0", "--save-every", "8"]
    assert cli.main([*argv, "--export-lora", str(tmp_path / "live")]) == 0
    assert cli.main(["export-lora", str(run / "checkpoints"), str(tmp_path / "ckpt")]) == 0
    assert (
        cli.main(["export-lora", str(run / "checkpoints"), str(tmp_path / "r1"), "--rank", "1"])
        == 0
    )
    live, ckpt = adapter_tensors(tmp_path / "live"), adapter_tensors(tmp_path / "ckpt")
    assert live.keys() == ckpt.keys() and all(torch.equal(live[k], ckpt[k]) for k in live)
    config = json.loads((tmp_path / "ckpt" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_folder / "bert")
    assert config["modules_to_save"] == ["classifier"]
    # The base from its folder (random fresh head) + adapter = the saved merged model.
    tokenizer = BertTokenizerFast.from_pretrained(tiny_folder / "bert")
    ids = tokenizer(["w1 good w2", "bad w0"], padding=True, return_tensors="pt")["input_ids"]
    merged = logits(AutoModelForSequenceClassification.from_pretrained(run / "model"), ids)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_folder / "bert", num_labels=2)
    assert rel(logits(load_peft(base, tmp_path / "ckpt"), ids), merged) < 1e-5
    report = json.loads((tmp_path / "r1" / EXPORT_REPORT).read_text())
    assert report["rank"] == 1 and report["relative_error"] > 0


def test_merge_record_keeps_every_vector_across_growth_and_removal():
    """A record grown past several capacities, with merges removed at both ends and in the
    middle, holds exactly the vectors of a plain list kept alongside, in one buffer per side."""
    layer = xf.FastRank1Linear(7, 5)
    record = MergeRecord.for_layer(layer)
    kept: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []
    torch.manual_seed(3)
    for t in range(70):
        with torch.no_grad():
            layer.lora_a.copy_(torch.randn(7))
            layer.lora_b.copy_(torch.randn(5))
        record.add(t, 0.5 + t, layer, "nearest")
        kept.append((t, 0.5 + t, layer.lora_a.detach().clone(), layer.lora_b.detach().clone()))
    for index in (0, 33, 67, 30):
        record.remove(index)
        del kept[index]
    assert record.rounds == [t for t, *_ in kept] and record.steps == [s for _, s, *_ in kept]
    assert torch.equal(record.a, torch.stack([a for *_, a, _ in kept]))
    assert torch.equal(record.b, torch.stack([b for *_, b in kept]))
    assert record.a.shape == (66, 7) and record.a._base is not None  # views of one buffer
    up, down = record.factors()
    scales = torch.tensor([s * layer.alpha for _, s, *_ in kept])
    assert torch.equal(up, torch.stack([b for *_, b in kept], dim=1) * scales)
    assert torch.equal(down, record.a)
    loaded = MergeRecord.from_state(record.state_dict())
    assert torch.equal(loaded.a, record.a) and torch.equal(loaded.b, record.b)
    empty = MergeRecord.for_layer(layer)
    assert empty.a.shape == (0, 7) and empty.state_dict()["b"].shape == (0, 5)


def test_merge_record_successive_cosines_match_the_dense_pieces():
    """Cosines between successive merged pieces, from the vectors, equal those of the explicit
    ``out x in`` matrices (float64), a piece that undoes the previous one gives -1, and the
    signs of the boosting steps count."""
    layer = xf.FastRank1Linear(6, 4, alpha=1.5)
    record = MergeRecord.for_layer(layer)
    torch.manual_seed(5)
    steps = [1.0, 0.5, -2.0, 1.0, 1.0]
    for t, step in enumerate(steps):
        with torch.no_grad():
            if t == 4:  # the same vectors as merge 3 with the opposite sign of b: undoes it
                layer.lora_a.copy_(record.a[3])
                layer.lora_b.copy_(-record.b[3])
            else:
                layer.lora_a.copy_(torch.randn(6))
                layer.lora_b.copy_(torch.randn(4))
        record.add(t, step, layer, "nearest")
    pieces = [
        step * 1.5 * torch.outer(b.double(), a.double())
        for step, a, b in zip(steps, record.a, record.b, strict=True)
    ]
    dense = torch.tensor(
        [
            float((p * q).sum() / (p.norm() * q.norm()))
            for p, q in zip(pieces[1:], pieces[:-1], strict=True)
        ],
        dtype=torch.float64,
    )
    cosines = record.successive_cosines()
    assert torch.allclose(cosines["piece"], dense, rtol=1e-6, atol=1e-12)
    assert cosines["piece"][3] == pytest.approx(-1.0, abs=1e-6)
    assert cosines["a"][3] == pytest.approx(1.0, abs=1e-6)
    unit = record.a.double() / record.a.double().norm(dim=1, keepdim=True)
    assert torch.allclose(cosines["a"], (unit[1:] * unit[:-1]).sum(1), atol=1e-12)
    # Two merges apart: P_4 undid P_3, so it meets P_2 with the opposite sign of P_3 and P_2.
    lag2 = record.successive_cosines(lag=2)
    dense2 = [
        float((p * q).sum() / (p.norm() * q.norm()))
        for p, q in zip(pieces[2:], pieces[:-2], strict=True)
    ]
    dense2 = torch.tensor(dense2, dtype=torch.float64)
    assert torch.allclose(lag2["piece"], dense2, rtol=1e-6, atol=1e-7)  # float32 vectors
    assert lag2["piece"][2] == pytest.approx(-float(cosines["piece"][2]), abs=1e-6)
    assert record.successive_cosines(lag=4)["piece"].shape == (1,)
    assert all(v.numel() == 0 for v in record.successive_cosines(lag=5).values())
    with pytest.raises(ValueError, match="lag"):
        record.successive_cosines(lag=0)
    one = MergeRecord.for_layer(layer)
    one.add(0, 1.0, layer, "nearest")
    assert all(v.numel() == 0 for v in one.successive_cosines().values())
