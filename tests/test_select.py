from accord.collect import select


def rows(pid, n):
    return [{"problem_id": pid, "style": "default", "sample_idx": i} for i in range(n)]


def test_random_correct_is_seeded_and_picks_one():
    r = rows("p", 5)
    a, b = select(r, "random-correct", 0, "t"), select(list(reversed(r)), "random-correct", 0, "t")
    assert len(a) == 1 and a == b
    picks = {select(rows(f"p{i}", 5), "random-correct", 0, "t")[0]["sample_idx"] for i in range(40)}
    assert len(picks) > 2  # actually random across problems


def test_policies_and_drop():
    assert select([], "random-correct", 0, "t") == []
    assert [x["sample_idx"] for x in select(rows("p", 3), "first-correct", 0, "t")] == [0]
    assert len(select(rows("p", 3), "all-correct", 0, "t")) == 3
