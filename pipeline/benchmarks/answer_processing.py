"""The VQA answer normaliser lmms-eval applies to TextVQA answers (its ``EvalAIAnswerProcessor``).

Rules read from lmms-eval ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py`` at commit
61e5060b4e8611b360b037779652cd735801581c and reimplemented here; the order of the steps matters:

1. lower-case; delete every ``,`` and ``?``; split a possessive ``'s`` off its word (``john's`` -> ``john 's``);
   strip; turn newlines and tabs into spaces; strip again.
2. for each character of :data:`SPACED_PUNCTUATION`: when the text (as it stood after step 1) holds it next to a
   space (``"x "`` or ``" x"``), every occurrence is deleted, otherwise every occurrence becomes a space
   (``coca-cola`` -> ``coca cola``, ``10 - 5`` -> ``10  5``). The source also deletes commas between digits, but
   step 1 has already deleted every comma, so that rule never fires (``1,000`` -> ``1000`` through step 1).
3. delete every period that is not followed by a digit (``3.14`` stays, ``a.m.`` -> ``am``, ``5.`` -> ``5``),
   at most :data:`MAX_PERIOD_DELETIONS` of them.
4. split on whitespace; map the number words of :data:`NUMBER_WORDS` to digits; drop the articles ``a``/``an``/
   ``the``; map the words of :data:`CONTRACTIONS`; join with single spaces.

Apostrophes and ``:``, ``%``, ``$``, ``&``, ``*``, ``#``, ``~``, ``|``, ``^`` survive untouched (``10%`` stays ``10%``).
"""

from __future__ import annotations

import re

# Punctuation handled by step 2 (the EvalAI list; "," and "?" are already gone after step 1).
SPACED_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'

# The source passes re.UNICODE (== 32) where re.sub takes its count, so only the first 32 periods are deleted.
MAX_PERIOD_DELETIONS = 32

# The source's period pattern opens with a mistyped look-behind, "(?!<=\d)", which is really a look-ahead for the
# text "<=digit" and never rejects at a period; what remains is "a period not followed by a digit".
_LONE_PERIOD = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Contraction table of the EvalAI processor as "written-form canonical-form" pairs. Kept complete, including the
# entries that can never match: the capitalised keys (the text is lower-cased first) and keys holding "'s" (step 1
# splits those into two words). "somebody'd" -> "somebodyd" runs the wrong way in the source; kept as it is.
_CONTRACTION_TABLE = """
aint ain't                  arent aren't                cant can't
couldve could've            couldnt couldn't            couldn'tve couldn't've
couldnt've couldn't've      didnt didn't                doesnt doesn't
dont don't                  hadnt hadn't                hadnt've hadn't've
hadn'tve hadn't've          hasnt hasn't                havent haven't
hed he'd                    hed've he'd've              he'dve he'd've
hes he's                    howd how'd                  howll how'll
hows how's                  Id've I'd've                I'dve I'd've
Im I'm                      Ive I've                    isnt isn't
itd it'd                    itd've it'd've              it'dve it'd've
itll it'll                  let's let's                 maam ma'am
mightnt mightn't            mightnt've mightn't've      mightn'tve mightn't've
mightve might've            mustnt mustn't              mustve must've
neednt needn't              notve not've                oclock o'clock
oughtnt oughtn't            ow's'at 'ow's'at            'ows'at 'ow's'at
'ow'sat 'ow's'at            shant shan't                shed've she'd've
she'dve she'd've            she's she's                 shouldve should've
shouldnt shouldn't          shouldnt've shouldn't've    shouldn'tve shouldn't've
somebody'd somebodyd        somebodyd've somebody'd've  somebody'dve somebody'd've
somebodyll somebody'll      somebodys somebody's        someoned someone'd
someoned've someone'd've    someone'dve someone'd've    someonell someone'll
someones someone's          somethingd something'd      somethingd've something'd've
something'dve something'd've somethingll something'll   thats that's
thered there'd              thered've there'd've        there'dve there'd've
therere there're            theres there's              theyd they'd
theyd've they'd've          they'dve they'd've          theyll they'll
theyre they're              theyve they've              twas 'twas
wasnt wasn't                wed've we'd've              we'dve we'd've
weve we've                  werent weren't              whatll what'll
whatre what're              whats what's                whatve what've
whens when's                whered where'd              wheres where's
whereve where've            whod who'd                  whod've who'd've
who'dve who'd've            wholl who'll                whos who's
whove who've                whyll why'll                whyre why're
whys why's                  wont won't                  wouldve would've
wouldnt wouldn't            wouldnt've wouldn't've      wouldn'tve wouldn't've
yall y'all                  yall'll y'all'll            y'allll y'all'll
yall'd've y'all'd've        y'alld've y'all'd've        y'all'dve y'all'd've
youd you'd                  youd've you'd've            you'dve you'd've
youll you'll                youre you're                youve you've
"""


def _pairs(table: str) -> dict[str, str]:
    words = table.split()
    return dict(zip(words[0::2], words[1::2], strict=True))


CONTRACTIONS = _pairs(_CONTRACTION_TABLE)


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    out = text
    for mark in SPACED_PUNCTUATION:
        # The space test looks at the text before any replacement, as the source does.
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced else " ")
    return _LONE_PERIOD.sub("", out, count=MAX_PERIOD_DELETIONS)


def _words(text: str) -> str:
    kept = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            kept.append(CONTRACTIONS.get(word, word))
    return " ".join(kept)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer exactly as lmms-eval's EvalAI answer processor does (see the module docstring)."""
    return _words(_punctuation(_tokenize(text)))
