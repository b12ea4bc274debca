# Synthetic captions for the embed benchmarks (issue 20): deterministic for a seed, plain lowercase English words
# that are one T5 token each, so every caption tokenizes to exactly its intended length (EOS included). The mix of
# lengths follows what caption sets for image and video models hold: tag lists and short alt texts, one-sentence
# captions, and long dense captions written by vision-language models.
#   python benchmarks/make_captions.py captions.txt [--count 20000] [--seed 0]
import argparse
import random
import sys

sys.path.insert(0, ".")

# (share, shortest, longest): tokens per caption with EOS, drawn uniformly within a band
LENGTH_MIX = ((0.25, 5, 24), (0.45, 25, 99), (0.30, 100, 300))

WORDS = """a an the of and in on with at by from for to under over near behind above below between into its his
her their this that some two three four many few small large big tall short long old young new red blue green
yellow black white brown gray orange pink purple golden dark bright light soft warm cold wet dry wooden stone metal
glass paper cloth man woman boy girl child people person family friends crowd dog cat horse bird fish cow sheep
car bus train boat plane bike truck road street city town village house building room kitchen window door table
chair bed floor wall roof garden park field forest tree trees flower flowers grass river lake sea ocean beach sand
mountain hill sky cloud clouds sun moon star night day morning evening summer winter snow rain water fire smoke
food bread cake fruit apple coffee tea cup plate bowl book phone computer camera picture photo image painting
drawing portrait scene view style art artist light shadow color background front side top bottom left right
center standing sitting walking running playing holding looking wearing smiling eating reading riding flying
shirt dress hat coat shoes glasses hair face eyes hand hands head body group line pair set piece detail close
high low wide open empty full quiet busy beautiful simple modern vintage classic natural digital realistic
""".split()


def one_token_words(tokenizer) -> list[str]:
    """The words of WORDS that the tokenizer keeps as one token (at a caption's start and after a space alike)."""
    words = [w for w in dict.fromkeys(WORDS) if len(tokenizer.encode_ids(w, add_eos=False)) == 1]
    if len(words) < 50:
        raise ValueError(f"only {len(words)} one-token words: not a T5 tokenizer?")
    return words


def caption_lengths(count: int, seed: int = 0) -> list[int]:
    """Intended token counts (EOS included) of `count` captions, drawn from LENGTH_MIX."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        pick, low, high = rng.random(), 0, 0
        for share, low, high in LENGTH_MIX:
            pick -= share
            if pick < 0:
                break
        lengths.append(rng.randint(low, high))
    return lengths


def make_captions(count: int, tokenizer, seed: int = 0) -> list[str]:
    """`count` captions; caption i is caption_lengths(count, seed)[i] - 1 words, so that many tokens with EOS."""
    words = one_token_words(tokenizer)
    rng = random.Random(seed + 1)
    return [" ".join(rng.choices(words, k=n - 1)) for n in caption_lengths(count, seed)]


if __name__ == "__main__":
    from t5core.tokenizer import BUNDLED_SPIECE, load_tokenizer

    p = argparse.ArgumentParser(description="write synthetic captions, one a line")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=str(BUNDLED_SPIECE))
    args = p.parse_args()
    captions = make_captions(args.count, load_tokenizer(args.tokenizer), args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    print(f"wrote {args.out}: {len(captions)} captions")
