"""Inside-Out knowledge scores (Gekhman et al. 2025, arXiv 2503.15299): does the model know more than it says?

For each item, answer candidates (correct: the memorised answer and its aliases; incorrect: the fact's counterfactual
object and other objects of its relation) are scored externally (the model's own length-normalised log-probability of
the answer after the closed-book question) and internally (a logistic probe on the hidden state of question + answer,
per layer). K is the fraction of (correct, incorrect) pairs ranked correctly; hidden knowledge is internal K above
external K (docs/METHOD.md, "Inside-Out knowledge").

candidates.py builds the candidates, forward.py scores them in one forward pass each, ranking.py computes K and its
summaries, stage.py is the stage, reporting.py its report section and figure.
"""
