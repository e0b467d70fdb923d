"""VQA accuracy for VQAv2, VizWiz and TextVQA: the official rule of ``vqaEval.py`` (GT-Vision-Lab/VQA).

Per question, with n human answers (10 in all three datasets; any n >= 1 works the same way)::

    acc = mean over i of min(1, #{j != i : gt_j == pred} / 3)

i.e. the average over the n leave-one-out subsets, each human answer left out once by position.

Normalization (:func:`normalize_answer`, the official ``processPunctuation`` + ``processDigitArticle``): each
of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space in the text or when the
text has a comma between two digits ("2,000" -> "2000"), else replaced by a space; a period not followed by a
digit is deleted ("yes." -> "yes", "3.5" kept; like the official code, at most 32 of them); then lower-case,
number words "none".."ten" -> digits, articles a/an/the dropped, contractions restored ("isnt" -> "isn't").

What is followed, and where the official scripts differ:

- ``variant="official"`` (the default, used by every scorer here) is ``vqaEval.py``: whitespace is cleaned
  always, but answers are normalized only when the human answers disagree (``len(set(gts)) > 1``), and then
  both the prediction and the human answers are normalized.
- Before that, the prediction goes through :func:`evalai_answer`, as LLaVA's
  ``convert_vqav2_for_submission.py`` and ``convert_vizwiz_for_submission.py`` did before uploading to the
  evaluation servers that produced the published VQAv2 and VizWiz numbers. This is what makes "Yes" match ten
  "yes": unprocessed, the official rule compares it raw.
- ``variant="m4c"`` is LLaVA's ``m4c_evaluator.py`` (``TextVQAAccuracyEvaluator``, which produced LLaVA's
  TextVQA number): ``EvalAIAnswerProcessor`` on the prediction and on every human answer, always. Its
  processor first lower-cases, deletes "," and "?", and splits "'s" off ("dog's" -> "dog 's"); its comma rule
  also accepts runs of commas. The two variants therefore differ when all human answers agree but are not in
  normal form (ten "2,000" against "2000": 0 officially, 1 in m4c) and on possessives ("dog's" predicted
  against disagreeing human answers "dog's": 0 officially after LLaVA's submission processing, 1 in m4c). m4c
  also requires exactly 10 answers.
- VizWiz's own server code normalizes only the prediction, never the human answers; this module does not copy
  that.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pipelines.eval.datasets import TEXTVQA, VIZWIZ, VQAV2
from pipelines.eval.scoring.common import (
    ScoringError,
    Source,
    base_counts,
    pct,
    read_answered,
    read_json,
    result,
)
from pipelines.eval.scoring.intervals import mean_replicates

# The official tables: contractions written without apostrophe -> with (word level, after lower-casing, so the
# capitalized keys never match; "somebody'd" -> "somebodyd" is the official table's own entry).
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
    howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
    it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
    mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
    oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
    shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
    shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
    thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
    theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
    whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
    whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
    whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've
    yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've
    y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
    """.split()
)
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (no-op) lookahead, not a lookbehind,
# so a period is kept only when a digit follows. ``sub(..., re.UNICODE)`` passes 32 as ``count``: at most 32
# periods are removed.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
_COMMA_DIGITS_M4C = re.compile(r"(?<=\d)(,)+(?=\d)")

Variant = Literal["official", "m4c"]


def _punctuation(text: str, comma_rule: re.Pattern[str]) -> str:
    out = text
    delete = comma_rule.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official VQA answer normalization (``processPunctuation`` then ``processDigitArticle``)."""
    return _digits_articles(_punctuation(text, _COMMA_DIGITS))


def evalai_answer(text: str) -> str:
    """LLaVA's ``EvalAIAnswerProcessor`` (m4c): lower, drop "," "?", split "'s", then the official steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _clean_whitespace(text)
    return _digits_articles(_punctuation(text, _COMMA_DIGITS_M4C))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], variant: Variant = "official") -> float:
    """Accuracy in [0, 1] of one prediction against the human answers (variants: see the module doc)."""
    if not gt_answers:
        raise ValueError("a VQA question needs at least one human answer")
    if variant == "official":
        pred, gts = _clean_whitespace(prediction), [_clean_whitespace(a) for a in gt_answers]
        if len(set(gts)) > 1:
            pred, gts = normalize_answer(pred), [normalize_answer(a) for a in gts]
    elif variant == "m4c":
        pred, gts = evalai_answer(prediction), [evalai_answer(a) for a in gt_answers]
    else:
        raise ValueError(f"unknown VQA variant {variant!r}")
    matches = sum(g == pred for g in gts)
    # Leaving out answer i removes one match exactly when gt_i itself matches.
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


Truth = tuple[list[str], str]  # (human answers, answer type)


def _truth(ann: Any, key: str, where: str) -> tuple[str, Truth]:
    """(id, truth) of one official annotation record; a record without ``key`` or answers is an error."""
    if not isinstance(ann, Mapping) or key not in ann:
        raise ScoringError(f"{where}: annotation record has no {key!r}")
    answers = ann.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ScoringError(f"{where}: 'answers' must be a non-empty list")
    if any(isinstance(a, Mapping) and "answer" not in a for a in answers):
        raise ScoringError(f"{where}: an answer record has no 'answer'")
    texts = [str(a["answer"] if isinstance(a, Mapping) else a) for a in answers]
    return str(ann[key]), (texts, str(ann.get("answer_type", "all")))


def _vqav2_truth(path: str) -> dict[str, Truth]:
    data = read_json(path, "VQAv2 annotations")
    if not isinstance(data, Mapping) or not isinstance(data.get("annotations"), list):
        raise ScoringError(f"{path}: expected the official VQAv2 annotations JSON with an 'annotations' list")
    return dict(_truth(ann, "question_id", f"{path}: annotations[{i}]") for i, ann in enumerate(data["annotations"]))


def _vizwiz_truth(path: str) -> dict[str, Truth]:
    data = read_json(path, "VizWiz annotations")
    if not isinstance(data, list):
        raise ScoringError(f"{path}: expected the official VizWiz annotations JSON (a list of records with 'image')")
    return dict(_truth(ann, "image", f"{path}: [{i}]") for i, ann in enumerate(data))


def _textvqa_truth(path: str) -> tuple[dict[str, Truth], dict[tuple[str, str], Truth]]:
    data = read_json(path, "TextVQA annotations")
    if not isinstance(data, Mapping) or not isinstance(data.get("data"), list):
        raise ScoringError(f"{path}: expected the official TextVQA annotations JSON with a 'data' list")
    by_id, by_image = {}, {}
    for i, ann in enumerate(data["data"]):
        qid, truth = _truth(ann, "question_id", f"{path}: data[{i}]")
        by_id[qid] = truth
        by_image[(str(ann.get("image_id")), str(ann.get("question", "")).lower())] = truth
    return by_id, by_image


def textvqa_question(prompt: str) -> str:
    """The bare question of a LLaVA TextVQA prompt (no OCR tokens, no instruction), as ``eval_textvqa.py``."""
    m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL) if prompt.startswith("OCR tokens: ") else None
    if m:
        return m.group(1)
    lines = [s for s in prompt.split("\n") if s.strip() and not s.startswith("Reference OCR token:")]
    return lines[0] if lines else ""


def score_vqa(
    benchmark: str, questions: Source, answers: Source, annotations: str | None, variant: Variant = "official"
) -> dict[str, Any]:
    """VQAv2 / VizWiz / TextVQA accuracy over the questions file, against the official annotations JSON.

    Ground truth is found by ``question_id`` (VQAv2, TextVQA), by the question's ``image`` (VizWiz), or for
    LLaVA's TextVQA file, whose ``question_id`` is the image id, by (image id, lower-cased question) as
    ``eval_textvqa.py``.
    """
    if annotations is None:
        raise ScoringError(f"{benchmark} needs --annotations (the official annotations JSON)")
    qname, qs, answer_file, by_id = read_answered(questions, answers)
    if benchmark == VQAV2:
        truth, by_image = _vqav2_truth(annotations), {}
    elif benchmark == VIZWIZ:
        truth, by_image = _vizwiz_truth(annotations), {}
    elif benchmark == TEXTVQA:
        truth, by_image = _textvqa_truth(annotations)
    else:
        raise ValueError(f"not a VQA-accuracy benchmark: {benchmark}")

    per_type: dict[str, list[float]] = defaultdict(list)
    accs = []
    for qid, (line, q) in qs.items():
        key = str(q.get("image")) if benchmark == VIZWIZ else qid
        gt = truth.get(key) or by_image.get((qid, textvqa_question(str(q.get("text", ""))).lower()))
        if gt is None:
            raise ScoringError(
                f"{qname}:{line}: question {qid} has no ground truth in {annotations} "
                "(test splits are scored by the official evaluation servers)"
            )
        ans = by_id.get(qid)
        if ans is None:
            acc = 0.0
        elif variant == "official":
            acc = vqa_accuracy(evalai_answer(ans.text), gt[0])
        else:
            acc = vqa_accuracy(ans.text, gt[0], variant)
        accs.append(acc)
        per_type[gt[1]].append(acc)
    breakdown = {"accuracy": pct(sum(accs), len(accs))}
    if set(per_type) != {"all"}:
        breakdown["per_answer_type"] = {t: pct(sum(v), len(v)) for t, v in sorted(per_type.items())}
    counts = base_counts(len(qs), len(by_id), answer_file)
    replicates = mean_replicates(accs, benchmark)
    return result(benchmark, "accuracy", breakdown["accuracy"], breakdown, counts, answer_file.malformed, replicates)
