from bench.cli import run


def test_tiny_mlp_fixture(tiny_mlp):
    problem, _ = tiny_mlp
    assert problem.n_train == 60 and problem.n_queries == 6
    assert next(problem.model.parameters()).dtype.is_floating_point


def test_tiny_run(make_cfg):
    record = run(make_cfg("digits_mlp", "estimator=grad_dot"))
    assert record["task"] == "digits_mlp" and record["estimator"] == "grad_dot"
