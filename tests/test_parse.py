from collections import Counter

from data_prep.parse import Pair, ParseResult, filter_grounded, grounding, parse_pairs

# A released-synthesizer-style output: two well-formed pairs, the second one multiple choice.
WELL_FORMED = (
    "<QUE> What does the assert statement do? <ANS> It raises AssertionError when its expression is false. </END>\n\n"
    "<QUE> Is assert removed under -O?\nOptions:\n- yes\n- no <ANS> yes </END>"
)
# A small model's output: no </END>, pairs separated by blank lines, cut off by max_new_tokens.
SMALL_MODEL = (
    "<QUE> What is the \"break\" statement? <ANS> It terminates the nearest enclosing loop.\n\n"
    "<QUE> What does \"continue\" do? <ANS> It continues with the next cycle of the loop.\n\n"
    "<QUE> What happens to the else clause? <ANS> It is skipped when the loop"
)


def test_strict_keeps_pairs_closed_by_end_tags():
    result = parse_pairs(WELL_FORMED, "strict")
    assert result.pairs == [
        Pair("What does the assert statement do?", "It raises AssertionError when its expression is false."),
        Pair("Is assert removed under -O?\nOptions:\n- yes\n- no", "yes"),
    ]
    assert result.dropped == {}


def test_strict_drops_the_trailing_piece_without_end_tag():
    result = parse_pairs(WELL_FORMED + "\n\n<QUE> Unfinished? <ANS> Because", "strict")
    assert len(result.pairs) == 2
    assert result.dropped == {"no_end_tag": 1}


def test_strict_keeps_nothing_from_output_without_end_tags():
    result = parse_pairs(SMALL_MODEL, "strict")
    assert result.pairs == []
    assert result.dropped == {"no_end_tag": 1}


def test_lenient_splits_pairs_at_blank_lines_and_drops_the_cut_off_last_pair():
    result = parse_pairs(SMALL_MODEL, "lenient")
    assert [p.question for p in result.pairs] == ['What is the "break" statement?', 'What does "continue" do?']
    assert result.dropped == {"unfinished": 1}  # "It is skipped when the loop" (max_new_tokens cut it)


def test_lenient_ends_a_pair_at_the_next_question_tag():
    result = parse_pairs("<QUE> q1 <ANS> a1 <QUE> q2 <ANS> a2", "lenient")
    assert result.pairs == [Pair("q1", "a1"), Pair("q2", "a2")]


def test_lenient_stops_at_a_new_context_tag():
    output = "<QUE> q1 <ANS> a1 </CON>\n\n<CON> invented text </CON>\n\n<QUE> q2 <ANS> a2"
    result = parse_pairs(output, "lenient")
    assert result.pairs == [Pair("q1", "a1")]
    assert result.dropped == {"after_new_context": 1}


def test_lenient_keeps_well_formed_output_like_strict():
    assert parse_pairs(WELL_FORMED, "lenient").pairs == parse_pairs(WELL_FORMED, "strict").pairs


def test_duplicate_questions_are_dropped_case_insensitively():
    output = "<QUE> What is X? <ANS> a </END>\n\n<QUE> what is x? <ANS> b </END>"
    for mode in ("strict", "lenient"):
        result = parse_pairs(output, mode)
        assert result.pairs == [Pair("What is X?", "a")]
        assert result.dropped == {"duplicate_question": 1}


def test_piece_without_answer_tag_is_dropped():
    result = parse_pairs("<QUE> What is X?  X is a thing. </END>", "strict")
    assert result.pairs == [] and result.dropped == {"no_answer_tag": 1}


def test_piece_with_two_answer_tags_is_dropped():
    result = parse_pairs("<QUE> q <ANS> a <ANS> b </END>", "strict")
    assert result.pairs == [] and result.dropped == {"multiple_answer_tags": 1}


def test_empty_answer_is_dropped():
    result = parse_pairs("<QUE> q <ANS>   </END>", "strict")
    assert result.pairs == [] and result.dropped == {"empty_answer": 1}


def test_question_must_start_with_question_tag():
    result = parse_pairs("Question: q <ANS> a </END>", "strict")
    assert result.pairs == [] and result.dropped == {"no_question_tag": 1}


def test_strict_keeps_an_empty_question_like_the_reference_but_lenient_drops_it():
    assert parse_pairs("<QUE> <ANS> a </END>", "strict").pairs == [Pair("", "a")]
    assert parse_pairs("<QUE> <ANS> a </END>", "lenient").dropped == {"empty_question": 1}


def test_whitespace_between_pairs_is_not_counted_as_a_drop():
    assert parse_pairs("<QUE> q <ANS> a </END>\n\n", "strict").dropped == {}


def test_pair_to_dict_names_question_and_answer():
    assert Pair("q", "a").to_dict() == {"question": "q", "answer": "a"}


def test_grounding_is_the_share_of_answer_content_words_in_the_document():
    document = "The break statement terminates the nearest enclosing loop."
    # content words: break, terminates, loop, immediately -> 3 of 4 in the document
    assert grounding("The break terminates the loop immediately.", document) == 0.75


def test_grounding_of_an_answer_without_content_words_is_one():
    assert grounding("No.", "anything") == 1.0


def test_filter_grounded_drops_pairs_below_the_threshold_and_counts_them():
    document = "The break statement terminates the nearest enclosing loop."
    parsed = ParseResult([Pair("q1", "It terminates the enclosing loop."), Pair("q2", "Bananas grow on trees.")])
    result = filter_grounded(parsed, document, 0.5)
    assert [p.question for p in result.pairs] == ["q1"]
    assert result.dropped == {"ungrounded": 1}


def test_min_grounding_zero_keeps_every_pair():
    parsed = ParseResult([Pair("q", "Bananas grow on trees.")])
    assert filter_grounded(parsed, "unrelated", 0.0).pairs == parsed.pairs


def test_repetition_is_zero_for_an_answer_without_repeated_trigrams():
    from data_prep.parse import repetition

    assert repetition("The augmented assignment combines a binary operation and an assignment.") == 0.0
    assert repetition("Yes.") == 0.0


def test_repetition_is_high_for_a_looping_answer():
    from data_prep.parse import repetition

    loop = 'It is a method of the "Attribute" class.  It is a method of the "Attribute" class.  It is a method of the'
    assert repetition(loop) > 0.5


def test_filter_repetitive_drops_looping_answers_and_counts_them():
    from data_prep.parse import Pair, ParseResult, filter_repetitive

    good = Pair("What does break do?", "It exits the nearest enclosing loop.")
    bad = Pair("What is a tuple?", "A tuple is a sequence. A tuple is a sequence. A tuple is a sequence. A tuple is a")
    result = filter_repetitive(ParseResult([good, bad], Counter({"no_answer_tag": 2})), 0.5)
    assert result.pairs == [good]
    assert result.dropped == Counter({"no_answer_tag": 2, "repetitive": 1})


def test_filter_repetitive_at_one_keeps_everything():
    from data_prep.parse import Pair, ParseResult, filter_repetitive

    loop = Pair("q", "a b c a b c a b c a b c")
    assert filter_repetitive(ParseResult([loop], Counter()), 1.0).pairs == [loop]


def test_lenient_trims_an_answer_that_starts_repeating_itself():
    from data_prep.parse import trim_repeated_sentences

    looped = 'The "break" statement is used to exit a loop.  The "break" statement is used to exit a loop.  The "break'
    assert trim_repeated_sentences(looped) == 'The "break" statement is used to exit a loop.'


def test_trim_cuts_an_unfinished_last_sentence_after_a_finished_one():
    from data_prep.parse import trim_repeated_sentences

    assert trim_repeated_sentences("A tuple is immutable. It can hold any") == "A tuple is immutable."
    assert trim_repeated_sentences("The syntax for the assignment statement is") == "The syntax for the assignment statement is"


def test_trim_keeps_an_answer_without_repetition_unchanged():
    from data_prep.parse import trim_repeated_sentences

    text = "It exits the loop.\nThe else clause is skipped."
    assert trim_repeated_sentences(text) == text


def test_strict_mode_does_not_trim_answers():
    out = "<QUE> q? <ANS> A b. A b. </END>"
    assert parse_pairs(out, "strict").pairs[0].answer == "A b. A b."
    assert parse_pairs(out, "lenient").pairs[0].answer == "A b."


def test_pairs_expose_options_cot_and_final_answer_like_the_formatter():
    from data_prep.format import parse_item
    from data_prep.parse import structure_counts

    out = (
        "<QUE> Which statement loops?\nOptions:\n- while\n- pass <ANS> while </END>\n\n"
        "<QUE> Is a set ordered?\nOptions:\n- yes\n- no\nLet's think step by step. <ANS> Sets do not record "
        "position.\nTherefore, the answer is no </END>\n\n"
        "<QUE> What does pass do? Let's think step by step. <ANS> It does nothing. </END>\n\n"
        "<QUE> What is a tuple? <ANS> An immutable sequence. </END>\n\n"
        "<QUE> Pick one:\nOptions:\n- a\n- b <ANS> c </END>"
    )
    pairs = parse_pairs(out, "strict").pairs
    assert [p.options for p in pairs] == [["while", "pass"], ["yes", "no"], None, None, ["a", "b"]]
    assert [p.cot for p in pairs] == [False, True, True, False, False]
    assert [p.final_answer for p in pairs] == ["while", "no", None, "An immutable sequence.", "c"]
    assert pairs[1].stem == "Is a set ordered?"
    assert [p.structure_issue for p in pairs] == [None, None, "cot_without_final_answer", None,
                                                  "options_answer_matches_no_option"]
    for p in pairs:  # the formatter's own family detection agrees
        item, reason = parse_item(p.to_dict())
        assert reason == p.structure_issue
        if item is not None:
            assert list(item.options) == (p.options or []) and item.answer == p.final_answer
    assert structure_counts(pairs) == {"options": 2, "options_cot": 1, "cot": 1, "plain": 1,
                                       "issue:cot_without_final_answer": 1, "issue:options_answer_matches_no_option": 1}
    assert pairs[0].to_structured_dict() == {"question": pairs[0].question, "answer": "while",
                                             "options": ["while", "pass"], "cot": False, "final_answer": "while"}


def test_lenient_keeps_a_cot_final_answer_line_without_closing_punctuation():
    """Issue 16, item 16: the unpunctuated final line was cut as a trail-off and the pair then dropped as
    cot_without_final_answer."""
    out = ("<QUE> How many sides has a triangle? Let's think step by step. <ANS> A triangle has "
           "three sides. Nothing else adds any.\nTherefore, the answer is 3\n")
    result = parse_pairs(out, "lenient")
    assert len(result.pairs) == 1
    pair = result.pairs[0]
    assert pair.cot and pair.answer.endswith("Therefore, the answer is 3") and pair.final_answer == "3"
    assert pair.structure_issue is None
    trailing = parse_pairs("<QUE> What is X? <ANS> X is a Y. X is a", "lenient").pairs[0]  # still cut
    assert trailing.answer == "X is a Y."


# --- issue 23: pairs worth training on ---


def test_lenient_keeps_an_answer_written_after_a_blank_line_following_the_answer_tag():
    # SmolLM2 did this on 2 of the 70 quickstart documents: "<ANS>\n\n" then the answer.
    output = "<QUE> What does pass do? <ANS>\n\nIt does nothing.\n\n<QUE> What is a set? <ANS> An unordered collection."
    result = parse_pairs(output, "lenient")
    assert result.pairs == [Pair("What does pass do?", "It does nothing."),
                            Pair("What is a set?", "An unordered collection.")]
    assert result.dropped == {}


def test_grounding_counts_only_answer_words_that_are_not_in_the_question():
    document = 'The "assert" statement is a convenient way to insert debugging assertions into a program.'
    question = 'What is the "assert" statement?'
    # new content words: fantasy, magical, magic -> none in the document (the old rule counted assert, statement)
    assert grounding('The "assert" statement is a fantasy of magical magic.', document, question) == 0.0
    assert grounding("A convenient way to insert debugging assertions.", document, question) == 1.0
    # options of a multiple-choice question are not the question's words: the answer picks one of them
    assert grounding("debugging", document, "Which is it for?\nOptions:\n- debugging\n- painting") == 1.0


def test_filter_grounded_drops_an_invented_answer_that_repeats_the_question():
    document = 'The "assert" statement is a convenient way to insert debugging assertions into a program.'
    invented = Pair('What is the "assert" statement?', 'The "assert" statement is a fantasy statement, magical magic.')
    good = Pair('What is the "assert" statement?', "A convenient way to insert debugging assertions.")
    assert filter_grounded(ParseResult([invented]), document, 0.3).dropped == {"ungrounded": 1}
    assert filter_grounded(ParseResult([good]), document, 0.3).pairs == [good]


def test_filter_grounded_drops_a_circular_answer_under_its_own_reason():
    document = "The global statement is a declaration which holds for the entire current code block."
    circular = Pair('What is the "global" statement?', 'The "global" statement is a statement.')
    result = filter_grounded(ParseResult([circular, Pair("Is it a declaration?", "Yes.")]), document, 0.3)
    assert result.pairs == [Pair("Is it a declaration?", "Yes.")]  # no content words at all: nothing to ground
    assert result.dropped == {"circular": 1}


def test_answers_shared_by_two_documents_are_dropped_in_both():
    from data_prep.parse import drop_shared_answers

    same = "The if statement is used for conditional execution."
    per_doc = [
        ParseResult([Pair("What is if?", same), Pair("What does elif do?", "It tests another expression.")]),
        ParseResult([Pair("What is else?", "the if statement is used for  conditional execution")]),  # case, spacing
        ParseResult([Pair("Is it a loop?", "No."), Pair("What is while?", "Repeated execution.")]),
        ParseResult([Pair("Is it a function?", "No.")]),  # no content words: a short answer may recur
    ]
    out = drop_shared_answers(per_doc)
    assert [[p.question for p in r.pairs] for r in out] == [
        ["What does elif do?"], [], ["Is it a loop?", "What is while?"], ["Is it a function?"]]
    assert [dict(r.dropped) for r in out] == [{"duplicate_answer": 1}, {"duplicate_answer": 1}, {}, {}]
    # one document repeating its own answer under two questions is not a cross-document duplicate
    alone = drop_shared_answers([ParseResult([Pair("q1", same), Pair("q2", same)])])
    assert len(alone[0].pairs) == 2


def test_lenient_drops_an_answer_that_ends_mid_sentence():
    output = ("<QUE> What is the syntax of assignment? <ANS> The syntax for the assignment statement is\n\n"
              "<QUE> What does pass do? <ANS> It does nothing.\n\n"
              "<QUE> What is a set? <ANS> An unordered collection\n\n"
              "<QUE> Which statement loops?\nOptions:\n- while\n- pass <ANS> while\n\n"
              "<QUE> What happens to the else clause? <ANS> It is skipped when the loop")
    result = parse_pairs(output, "lenient")
    assert [p.answer for p in result.pairs] == ["It does nothing.", "An unordered collection", "while"]
    assert result.dropped == {"unfinished": 2}
    # the reference (strict) keeps what </END> closed
    assert parse_pairs("<QUE> q <ANS> The syntax is </END>", "strict").pairs == [Pair("q", "The syntax is")]


def test_is_unfinished_reads_the_end_of_the_answer():
    from data_prep.parse import is_unfinished

    finished = ["It does nothing.", 'It is written "x += 1"', "Yes", "Repeated execution", "Is it? Yes!",
                "(see the for statement)"]
    unfinished = ["The syntax for the assignment statement is", "It is skipped when the loop", "It returns the",
                  "The value of", 'It is written as "', "Objects are compared by"]
    assert [is_unfinished(a) for a in finished] == [False] * len(finished)
    assert [is_unfinished(a) for a in unfinished] == [True] * len(unfinished)


def test_lenient_counts_a_looping_tail_as_one_drop():
    # the quickstart's "pairs dropped 59": 44 no_answer_tag pieces, mostly one line repeated (8 in one document)
    output = ("<QUE> What is X? <ANS> X is a thing.\n\n" + "What is X used for?\n\n" * 8 + "What is X")
    result = parse_pairs(output, "lenient")
    assert result.pairs == [Pair("What is X?", "X is a thing.")]
    assert result.dropped == {"looping_tail": 1}
    # a loop of whole pairs keeps its first period, drops the rest as one tail
    loop = "<QUE> What is X? <ANS> X is a thing.\n\n<QUE> What is Y? <ANS> Y is another.\n\n"
    result = parse_pairs(loop * 4 + "<QUE> What is", "lenient")
    assert [p.question for p in result.pairs] == ["What is X?", "What is Y?"]
    assert result.dropped == {"looping_tail": 1}
    # pieces without <ANS> that do not repeat are still counted one by one
    assert parse_pairs("<QUE> q <ANS> Yes.\n\nA note.\n\nAnother note.", "lenient").dropped == {"no_answer_tag": 2}
    # strict is the reference: every piece is its own drop
    assert parse_pairs(loop * 2 + "</END>", "strict").dropped["multiple_answer_tags"] == 1
