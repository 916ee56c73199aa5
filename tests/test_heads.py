"""The task head's defaults: its own learning rate (a fresh layer learns at a floor, whatever the adapter's
lr), a regression head that starts at the training labels' mean, and `lrft init` writing both out."""

from __future__ import annotations

import pytest
import yaml

from lrft.recipe import HEAD_LR_MIN, TrainConfig
from lrft.targets import output_layer, start_regression_head_at
from tests.helpers import make_sentences, read_jsonl, tiny_bert, tiny_family, tiny_llama_config


@pytest.mark.parametrize(
    "lr, head_lr, expected",
    [
        (1e-3, None, HEAD_LR_MIN),  # LoRA's lr: the head gets the floor
        (3e-2, None, 3e-2),  # a tiny method's lr above the floor: the head shares it, as before
        (1e-3, 5e-4, 5e-4),  # an explicit head_lr always wins
    ],
)
def test_head_learning_rate(lr, head_lr, expected):
    assert TrainConfig(lr=lr, head_lr=head_lr).head_learning_rate == expected


def test_output_layer_of_each_head_shape():
    from transformers import LlamaForSequenceClassification

    bert = tiny_bert(num_labels=1)
    assert output_layer(bert) is bert.classifier
    roberta = tiny_family("roberta")  # RobertaClassificationHead: dense → out_proj
    assert output_layer(roberta) is roberta.classifier.out_proj
    llama = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    assert output_layer(llama) is llama.score
    assert not start_regression_head_at(llama, 2.5)  # Llama's score has no bias: left as transformers made it


def test_regression_head_starts_at_the_mean():
    model = tiny_bert(num_labels=1)
    assert start_regression_head_at(model, 2.75)
    assert float(model.classifier.bias.detach()) == 2.75
    assert not start_regression_head_at(tiny_bert(num_labels=2), 2.75)  # a classifier is left alone


def write_stsb(d, n_train=48, n_dev=16):
    """A tiny STS-B dir in GLUE's layout: the score is 4 for positive sentences, 1 for negative ones."""
    d.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for split, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rows = [
            f"{i}\tmain\tf\t2012\t{i:04d}\tnone\tnone\t{r['text']}\t{r['text'][::-1]}\t{1 + 3 * r['label']:.3f}\n"
            for i, r in enumerate(make_sentences(n, seed))
        ]
        (d / f"{split}.tsv").write_text(header + "".join(rows))
    return d


def test_regression_run_starts_at_the_mean_and_the_head_gets_its_lr(cli, tiny_recipe, tmp_path):
    data = write_stsb(tmp_path / "stsb")
    labels = [1 + 3 * r["label"] for r in make_sentences(48, 1)]
    recipe = tiny_recipe(
        "lora",
        name="reg",
        data={"task": "glue/stsb", "path": str(data)},
        train={"lr": 1e-3, "max_steps": 1, "eval_on_start": True},
    )
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "bias starts at the training labels' mean" in err and "(head lr 0.01)" in err
    start = next(m for m in read_jsonl(tmp_path / "runs" / "reg" / "metrics.jsonl") if m["type"] == "eval")
    # the step-0 predictions are the mean plus the random head's small output: their mean is near the
    # labels' mean (2.6 here), where a zero bias would predict around 0 (an eval loss of ~8)
    mean = sum(labels) / len(labels)
    variance = sum((y - mean) ** 2 for y in labels) / len(labels)
    assert start["loss"] < 1.5 * variance + 0.1


def test_init_writes_the_head_lr_for_heads_only(cli):
    code, out, err = cli("init", "--method", "lora")
    assert code == 0, err
    assert yaml.safe_load(out)["train"]["head_lr"] == HEAD_LR_MIN
    code, out, err = cli("init", "--method", "lora", "--task", "gsm8k", "--model", "smollm2")
    assert code == 0, err
    assert yaml.safe_load(out)["train"]["head_lr"] is None  # a causal LM has no task head


def test_optimizer_groups_use_the_head_lr(tiny_recipe):
    from lrft.recipe import load_recipe
    from lrft.training import Trainer

    trainer = Trainer(load_recipe(tiny_recipe("lora", train={"lr": 1e-3})))
    trainer.setup()
    groups = trainer.plan.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-3, HEAD_LR_MIN]  # "lr" is the warmup's 0
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in trainer.plan.head_params] != []
