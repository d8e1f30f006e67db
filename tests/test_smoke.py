import pytest


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2):
    assert "Paris" in smollm2.chat("What is the capital of France?", temperature=0, max_tokens=24)
