"""How often a 16-bit run picks the same next token as f32: teacher-forced argmax agreement.

Every dtype scores the same token sequence (one forward over the whole text, so each position
sees the true prefix, never its own earlier picks), and we count the positions whose argmax
equals the reference dtype's. The tests run it through cuda-emu on the tiny story model; on a
GPU, run it on SmolLM2:

    python -m pyllm.benchmarks.dtype_agreement --model models/smollm2-135m-instruct --backend cuda
"""

import argparse

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with "
    "her red ball. One day, she saw a big dog under a tree. The dog was sad because it had lost its "
    "bone. Lily wanted to help the dog, so she looked everywhere for the bone. She looked behind the "
    "slide, under the bench and near the pond. At last she found the bone next to a big rock. She "
    "gave it to the dog, and the dog wagged its tail and licked her hand. Lily was very happy. From "
    "that day on, the dog and Lily were best friends. They played together in the park every day. "
    "One morning it started to rain, and Lily could not go outside. She was sad and looked out of the "
    "window. Then she saw the dog sitting at the door, wet and cold. Her mom let the dog come in and "
    "gave it a warm towel. Lily and the dog sat by the fire and ate cookies. When the sun came out "
    "again, they ran back to the park and jumped in the puddles. Lily laughed and said, \"This is the "
    "best day ever!\" The dog barked, and they played until it was time to go home for dinner. "
    "The next week, Lily and her mom went to the shop to buy a new ball. The dog came with them and "
    "waited outside. Lily picked a blue ball with yellow stars on it. On the way home, a boy named Tom "
    "asked if he could play too. Lily said yes, and the three of them played catch until the sky "
    "turned orange. Tom said thank you and waved goodbye. Lily smiled, because now she had two friends."
)


def argmax_agreement(model_dir, backend="cuda-emu", dtypes=("f16", "bf16"), reference="f32",
                     text=STORY, n_tokens=256) -> dict:
    """{dtype: fraction of positions whose argmax matches the reference dtype's}, plus the
    number of positions scored under "positions"."""
    from pyllm import LLM

    def argmaxes(dtype, ids=None):
        llm = LLM(str(model_dir), backend=backend, dtype=dtype, show_progress=False)
        ids = ids or llm.tokenizer.encode(text)[:n_tokens]
        return llm.score(ids).argmax(axis=-1), ids

    expected, ids = argmaxes(reference)
    result = {dtype: float((argmaxes(dtype, ids)[0] == expected).mean()) for dtype in dtypes}
    return {**result, "positions": len(ids)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    result = argmax_agreement(args.model, args.backend, n_tokens=args.tokens)
    print(f"{args.model} on {args.backend}, {result['positions']} positions, argmax agreement with f32: "
          f"f16 {result['f16']:.1%}, bf16 {result['bf16']:.1%}")


if __name__ == "__main__":
    main()
