"""Comparisons the model tests share."""


def assert_logits_close(actual, expected, tolerance: float = 1e-5) -> None:
    """Equal up to float32 rounding, relative to the largest logit: the same computation can round differently in
    another batch or after a reload (other kernels), far below what a misplaced image or weight changes."""
    assert actual.shape == expected.shape
    difference = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert difference <= tolerance, f"logits differ by {difference:.3g} of the largest"
