from __future__ import annotations

from benchmarks.eval_gsm8k import answer_value, few_shot_prompts


def test_answer_value_takes_the_last_number() -> None:
    assert answer_value("She makes 9 * 2 = $18 every day.\n#### 18") == 18.0
    assert answer_value("a total of $1,234.50") == 1234.5
    assert answer_value("-3 degrees") == -3.0
    assert answer_value("no digits here") is None


def test_few_shot_prompts_hold_the_shots_and_the_labels() -> None:
    rows = [{"question": f"q{i}?", "answer": f"work\n#### {i * 10:,}"} for i in range(1, 9)]
    prompts, labels = few_shot_prompts(rows, shots=2)
    assert len(prompts) == 6 and labels == [30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    assert prompts[0].startswith("Question: q1?\nAnswer: work\n#### 10\n\nQuestion: q2?")
    assert prompts[0].endswith("Question: q3?\nAnswer:")
