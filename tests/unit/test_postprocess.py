from vlv_engine.engine.postprocess import official_postprocess


def test_trims_after_the_last_period():
    assert official_postprocess("A cat sits. It is grey. The wall beh") == "A cat sits. It is grey."


def test_drops_repeated_sentences_keeping_order():
    text = "A cat sits. It is grey. A cat sits. It is grey. A dog runs."
    assert official_postprocess(text) == "A cat sits. It is grey. A dog runs."


def test_text_without_period_is_kept():
    assert official_postprocess("a small red circle at the top") == "a small red circle at the top"
