"""The ``make demo`` job: boosting with merges really fits the teacher; eject changes nothing."""

from xgblora_fast import demo


def test_demo_boosting_reduces_loss_and_ejects_cleanly():
    result = demo.run(
        demo.build_parser().parse_args(["--rounds", "12", "--kappa", "8", "--backend", "torch"])
    )
    assert result["end"] < 0.6 * result["start"]
    assert result["eject_diff"] < 1e-5


def test_demo_bf16_weights_with_stochastic_merges_also_fit():
    args = ["--rounds", "12", "--kappa", "8", "--backend", "torch"]
    args += ["--dtype", "bfloat16", "--rounding", "stochastic"]
    result = demo.run(demo.build_parser().parse_args(args))
    assert result["end"] < 0.6 * result["start"]
