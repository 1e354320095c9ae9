"""The report's accuracy tables (training.caption_eval): types and finer groups on hand-checked answers."""

from training.caption_eval import accuracy_by_group, accuracy_by_type, answer_group


def q(qtype: str, answer: str) -> dict:
    return {"type": qtype, "answer": answer, "question": "?"}


QUESTIONS = [q("position", "left"), q("position", "Right"), q("position", "top"), q("yesno", "yes"),
             q("yesno", "no"), q("yesno", "no"), q("colour", "red")]
ANSWERS = ["left", "left", "Top.", "yes", "yes", "No", "red"]


def test_groups_split_position_by_axis_and_yesno_by_the_right_answer():
    assert [answer_group(x) for x in QUESTIONS] == ["position left/right", "position left/right", "position top/bottom",
                                                    "yesno yes", "yesno no", "yesno no", None]
    groups = accuracy_by_group(QUESTIONS, ANSWERS)
    assert groups == {"position left/right": {"accuracy": 0.5, "n": 2}, "position top/bottom": {"accuracy": 1.0, "n": 1},
                      "yesno no": {"accuracy": 0.5, "n": 2}, "yesno yes": {"accuracy": 1.0, "n": 1}}
    types = accuracy_by_type(QUESTIONS, ANSWERS)  # the groups partition their types
    assert types["position"] == {"accuracy": 2 / 3, "n": 3} and types["yesno"] == {"accuracy": 2 / 3, "n": 3}
