"""Calibration statistics and task-aware TLoRA: references by hand, allocation, frozen A, cache, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lrft import calibrate
from lrft.errors import LrftError
from lrft.inject import adapted, adapter_parameters
from lrft.methods.talora import TaLoRAParams, allocate, largest_remainder
from lrft.recipe import CalibrationConfig
from lrft.targets import find_targets
from tests.helpers import (
    assert_close_scaled,
    assert_merge_parity,
    batch,
    build,
    calibration_features,
    labeled,
    pad_collate,
    tiny_bert,
)

BATCHES = [[0, 1, 2], [3, 4, 5]]


def reference_statistics(model, targets, features, batches):
    """float64 covariance over non-padding tokens and mean |W ⊙ ∂L/∂W| per batch, by hand."""
    model = model.double()
    inputs: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    hooks = [t.module.register_forward_hook(lambda m, a, o, n=t.name: inputs[n].append(a[0].detach())) for t in targets]
    importance = {t.name: 0.0 for t in targets}
    masks = []
    for idx in batches:
        b = pad_collate([features[i] for i in idx])
        masks.append(b["attention_mask"].bool())
        loss = model(**b).loss
        grads = torch.autograd.grad(loss, [t.module.weight for t in targets])
        for t, g in zip(targets, grads):
            importance[t.name] += float((t.module.weight.detach() * g).abs().mean()) / len(batches)
    for h in hooks:
        h.remove()
    cov = {}
    for t in targets:
        rows = torch.cat([x[m] for x, m in zip(inputs[t.name], masks)])  # (T, in): padding rows dropped
        cov[t.name] = rows.T @ rows / rows.shape[0]
    return cov, importance, int(sum(m.sum() for m in masks))


def test_statistics_match_a_float64_reference():
    model = tiny_bert()
    targets = find_targets(model, ["query", "value"])
    feats = calibration_features()
    stats = calibrate.run(
        model,
        targets,
        feats,
        BATCHES,
        pad_collate,
        frozenset({"covariance", "importance"}),
        CalibrationConfig(dtype="float64"),
    )
    ref_model = tiny_bert()
    cov, imp, tokens = reference_statistics(ref_model, find_targets(ref_model, ["query", "value"]), feats, BATCHES)
    assert all(n == tokens for n in stats.tokens.values()) and tokens == 6 * 7 - 6  # 6 padding tokens excluded
    for name in cov:
        assert_close_scaled(stats.covariance[name], cov[name], 1e-5, msg=name)
        assert stats.importance[name] == pytest.approx(imp[name], rel=1e-4)
    assert not any(p.grad is not None for p in model.parameters())  # nothing left behind
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_hooks_are_removed_even_when_a_statistic_is_not_finite():
    model = tiny_bert()
    targets = find_targets(model, ["query"])
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[7] = float("inf")
    feats = [{"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": 0}]
    with pytest.raises(LrftError, match=r"covariance of bert.encoder.layer.0.attention.self.query is not finite"):
        calibrate.run(model, targets, feats, [[0]], pad_collate, frozenset({"covariance"}), CalibrationConfig())
    assert all(not t.module._forward_pre_hooks for t in targets)


def test_center_subtracts_the_mean():
    model = tiny_bert()
    targets = find_targets(model, ["query"])
    feats = calibration_features()
    plain = calibrate.run(
        model, targets, feats, BATCHES, pad_collate, frozenset({"covariance"}), CalibrationConfig(dtype="float64")
    )
    centred = calibrate.run(
        model,
        targets,
        feats,
        BATCHES,
        pad_collate,
        frozenset({"covariance"}),
        CalibrationConfig(dtype="float64", center=True),
    )
    name = targets[0].name
    # C_centred = C - μμᵀ, so their difference is rank one and positive semi-definite
    eig = torch.linalg.eigvalsh(plain.covariance[name] - centred.covariance[name])
    assert eig[-1] > 0 and (eig[:-1].abs() < 1e-9 * eig[-1]).all()


@pytest.mark.parametrize("seed", range(40))
def test_ranks_sum_to_the_budget_within_bounds(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    weights = [rng.random() ** 3 * (rng.random() > 0.2) for _ in range(n)]
    hi = [rng.randint(1, 40) for _ in range(n)]
    lo = [min(rng.randint(1, 3), h) for h in hi]
    total = rng.randint(sum(lo), sum(hi))
    ranks = largest_remainder(weights, total, lo, hi)
    assert sum(ranks) == total and all(lo_i <= r <= hi_i for r, lo_i, hi_i in zip(ranks, lo, hi))


def test_allocation_follows_eq_7():
    targets = find_targets(tiny_bert(), ["query", "value"])  # 4 modules of 32 × 32
    importance = dict(zip([t.name for t in targets], [1.0, 3.0, 0.0, 4.0]))
    plan = allocate(targets, importance, TaLoRAParams(rank=4, alpha=8.0))
    ranks = [plan[t.name]["rank"] for t in targets]
    assert ranks == [2, 6, 1, 7] and sum(ranks) == 16  # 16·(1,3,0,4)/8 = 2, 6, 0→min_rank 1, 8 → 7
    for t, r in zip(targets, ranks):
        share = importance[t.name] / 8
        alpha = r * (4 * 8.0 / 4) * share  # α_i = r_i·(α_total/r)·S_i/ΣS
        assert plan[t.name]["alpha"] == pytest.approx(alpha) and plan[t.name]["scale"] == pytest.approx(alpha / r)
    uniform = allocate(
        targets, importance, TaLoRAParams(rank=4, alpha=8.0, rank_allocation="uniform", alpha_allocation="uniform")
    )
    assert all(m["rank"] == 4 and m["scale"] == 2.0 for m in uniform.values())


def test_budget_too_small_for_min_rank():
    targets = find_targets(tiny_bert(), ["query", "value"])
    with pytest.raises(LrftError, match="adapter.params.min_rank: 5 × 4 modules exceeds the budget 16"):
        allocate(targets, None, TaLoRAParams(rank=4, min_rank=5))


def test_a_spans_the_top_singular_subspace_of_w_c():
    model, found, _, ctx, built = build("talora")
    for t in found:
        A = adapted(model)[t.name].adapter.A
        r = A.shape[0]
        torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal rows
        W, C = t.module.weight.detach().double(), ctx.calibration.covariance[t.name].double()
        Vh = torch.linalg.svd(W @ C).Vh[:r]
        torch.testing.assert_close((A.double().T @ A.double()), Vh.T @ Vh, atol=1e-5, rtol=0)  # same projector


def test_frozen_a_stays_bit_identical_and_only_b_trains():
    model, found, *_ = build("talora")
    model.train()
    A0 = {n: w.adapter.A.clone() for n, w in adapted(model).items()}
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and ".adapter." in n} == {"B"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(3):
        model(**labeled(model, batch())).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(w.adapter.A, A0[n]) for n, w in adapted(model).items())
    assert any(w.adapter.B.abs().sum() > 0 for w in adapted(model).values())
    trained_a, *_ = build("talora", freeze_a=False)
    assert any(n.endswith("adapter.A") for n, p in trained_a.named_parameters() if p.requires_grad)


def test_all_ablations_off_is_exactly_lora():
    """Uniform ranks and alphas, Kaiming A, A trained: the same adapters as lora with the same seed."""
    lora, *_ = build("lora", alpha=8.0)
    talora, *_ = build(
        "talora", alpha=8.0, init="random", rank_allocation="uniform", alpha_allocation="uniform", freeze_a=False
    )
    a, b = adapted(lora), adapted(talora)
    for n in a:
        assert torch.equal(a[n].adapter.A, b[n].adapter.A) and a[n].adapter.scale == b[n].adapter.scale
    assert sum(p.numel() for p in adapter_parameters(lora)) == sum(p.numel() for p in adapter_parameters(talora))


def test_tlora_task_aware_init_uses_singular_vectors():
    model, found, _, ctx, _ = build("tlora", init="task-aware")
    for t in found:
        ad = adapted(model)[t.name].adapter
        r = ad.A.shape[1]
        U, _, Vh = torch.linalg.svd(t.module.weight.detach() @ ctx.calibration.covariance[t.name])
        gram_a = ad.A.T @ ad.A
        assert_close_scaled(gram_a, gram_a[0, 0] * torch.eye(r), 1e-4)  # scaled orthonormal
        torch.testing.assert_close(
            ad.A / ad.A.norm(dim=0), Vh[:r].T * torch.sign(ad.A[0] * Vh[:r].T[0]), atol=1e-4, rtol=1e-3
        )
        # the random init's Frobenius norms in expectation: in/3 and r/3
        assert ad.A.norm() ** 2 == pytest.approx(t.shape[1] / 3, rel=1e-4)
        assert ad.C.norm() ** 2 == pytest.approx(r / 3, rel=1e-4)


# ------------------------------------------------------------------------------------- the CLI


def talora_recipe(tiny_recipe, name="ta", **params):
    return tiny_recipe(
        "talora",
        name=name,
        adapter={"method": "talora", "params": {"rank": 4, **params}},
        calibration={"samples": 16, "batch_size": 4},
    )


def test_train_writes_calibration_and_eval_rebuilds_without_it(cli, tiny_recipe, tmp_path, monkeypatch):
    code, out, err = cli("train", talora_recipe(tiny_recipe), "train.max_steps=3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "runs" / "ta"
    info = json.loads((run / "calibration" / "calibration.json").read_text())
    assert info["samples"] == 16 and set(info["statistics"]) == {"covariance", "importance"}
    mods = info["modules"]
    assert len(mods) == 4 and sum(m["rank"] for m in mods.values()) == 16
    assert all({"importance", "rank", "alpha", "scale", "tokens"} <= set(m) for m in mods.values())
    assert (run / "calibration" / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(load_file(run / "calibration" / "statistics.safetensors")) == 4
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {k: v["rank"] for k, v in config["meta"]["modules"].items()} == {k: v["rank"] for k, v in mods.items()}
    assert summary["calibration_seconds"] > 0
    assert summary["trainable_params"] == sum(m["rank"] * 32 for m in mods.values())  # B (32 × r_i) of each

    def no_calibration(*a, **k):
        raise AssertionError("eval and merge must not recalibrate")

    monkeypatch.setattr(calibrate, "run", no_calibration)
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)
    code, out, err = cli("merge", run, "--out", tmp_path / "merged", "--json")
    assert code == 0, err
    assert_merge_parity(json.loads(out))
    code, out, err = cli("count-params", "--method", "talora", "--calibrated", run, "--json")
    assert code == 0, err
    assert json.loads(out)["trainable"] == summary["trainable_params"]


def test_resume_and_cache_reuse_statistics(cli, tiny_recipe, tmp_path):
    first = talora_recipe(tiny_recipe, name="first")
    assert cli("train", first, "train.max_steps=2")[0] == 0
    code, _, err = cli("train", first, "train.max_steps=4")
    assert code == 0 and "reusing the run's statistics" in err
    second = talora_recipe(tiny_recipe, name="second", rank=2)
    code, _, err = cli("train", second, "train.max_steps=2", f"calibration.cache={tmp_path / 'runs' / 'first'}")
    assert code == 0 and "calibration: reusing statistics from" in err, err
    a = load_file(tmp_path / "runs" / "first" / "calibration" / "statistics.safetensors")
    b = load_file(tmp_path / "runs" / "second" / "calibration" / "statistics.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "override, expect",
    [
        ("adapter.target_modules=[query,key]", "another setup (targets, weights differ)"),
        ("calibration.seed=7", "another setup (examples differ)"),
    ],
)
def test_cache_fingerprint_mismatch_is_refused(cli, tiny_recipe, tmp_path, override, expect):
    assert cli("train", talora_recipe(tiny_recipe, name="src"), "train.max_steps=1")[0] == 0
    code, _, err = cli(
        "train",
        talora_recipe(tiny_recipe, name="dst"),
        "train.max_steps=1",
        override,
        f"calibration.cache={tmp_path / 'runs' / 'src'}",
    )
    assert code == 2 and err.count("error:") == 1
    assert "error: calibration.cache:" in err and expect in err, err
    assert not (tmp_path / "runs" / "dst").exists()


def test_too_many_calibration_samples(cli, tiny_recipe, tmp_path):
    code, _, err = cli("train", talora_recipe(tiny_recipe, name="many"), "calibration.samples=1000")
    assert code == 2 and "calibration.samples: 1000 is more than the 64 training examples" in err
    code, _, err = cli("train", talora_recipe(tiny_recipe, name="zero"), "calibration.samples=0")
    assert code == 2 and "calibration.samples: input should be greater than 0" in err


def test_calibration_plot_labels_tell_every_module_apart():
    """BERT has three `...dense` Linear layers per block: the importance chart names them apart."""
    kinds = [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    names = [f"bert.encoder.layer.{i}.{k}" for i in (0, 11) for k in kinds]
    labels = calibrate.module_labels(names)
    assert labels[:6] == [
        "L0 query",
        "L0 key",
        "L0 value",
        "L0 attention.output.dense",
        "L0 intermediate.dense",
        "L0 output.dense",
    ]
    assert len(set(labels)) == len(names) and labels[6] == "L11 query"
    assert calibrate.module_labels(["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj", "score"]) == [
        "L3 q_proj",
        "L3 down_proj",
        "score",
    ]
