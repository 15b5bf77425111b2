from fractions import Fraction

import pytest

from gazelle.rewards.math import (
    answers_equal,
    extract_hash_answer,
    extract_tag,
    extract_xml_answer,
    parse_number,
)


def test_extract_xml_answer_takes_the_last_complete_tag():
    assert extract_xml_answer("<reasoning>\n2+2\n</reasoning>\n<answer>\n 4 \n</answer>\n") == "4"
    assert extract_xml_answer("<answer>1</answer> no wait <answer>2</answer> done") == "2"
    assert extract_xml_answer("<answer>draft <answer>7</answer>") == "7"  # the stray opening tag is not swallowed
    assert extract_xml_answer("the answer is 4") is None  # the recipe would answer "the answer is 4"
    assert extract_xml_answer("<answer>4") is None  # truncated: no answer
    assert extract_xml_answer("<answer></answer>") == ""
    assert extract_tag("<think>a</think><result> x </result>", "result") == "x"


def test_extract_hash_answer():
    assert extract_hash_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert extract_hash_answer("so it costs\n#### $1,080") == "1080"
    assert extract_hash_answer("#### -3") == "-3"
    assert extract_hash_answer("a #### 1 then #### 2") == "2"
    assert extract_hash_answer("no final line") is None
    assert extract_hash_answer("####   ") is None


@pytest.mark.parametrize(("text", "value"), [
    ("1,234", Fraction(1234)), ("-3", Fraction(-3)), ("+4", Fraction(4)), ("3.50", Fraction(7, 2)),
    (".5", Fraction(1, 2)), ("$5", Fraction(5)), ("\\$5", Fraction(5)), ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)), ("1.5/3", Fraction(1, 2)), ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{12}{8}", Fraction(3, 2)), ("\\frac34", Fraction(3, 4)), ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("50%", Fraction(50)), ("7.", Fraction(7)), (" 42 ", Fraction(42)), ("\\boxed{12}", Fraction(12)),
    ("1,234,567.5", Fraction(2469135, 2)), ("\u22123", Fraction(-3)), ("$\\frac{1}{2}$", Fraction(1, 2)),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["3,4", "12,34", "abc", "1e3", "1 1/2", "5 dollars", "1/0", "\\frac{1}{0}", "",
                                  "...", "--3", "9" * 101, None])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_answers_equal():
    assert answers_equal("0.5", "1/2") and answers_equal("\\frac12", "0.5") and answers_equal("50%", "50")
    assert answers_equal("1,000", "1000") and answers_equal("72.0", "72") and answers_equal("$18", "18")
    assert answers_equal("0.3333333", "1/3")  # within the default relative tolerance 1e-6
    assert not answers_equal("0.3333333", "1/3", rel_tol=0)
    assert not answers_equal("3.33", "10/3")
    assert not answers_equal("1000001", "1000000")  # integers compare exactly whatever rel_tol
    assert not answers_equal("71", "72")
    assert answers_equal(" Paris.", "paris") and answers_equal("\\boxed{x + 1}", "x  +  1")
    assert not answers_equal("Paris", "Rome")
    assert not answers_equal(None, "1") and not answers_equal("1", None)
