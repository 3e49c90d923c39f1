"""A tiny byte-level BPE tokenizer carrying a model family's real special tokens.

Byte-level BPE means every string (any ASCII or UTF-8 text) encodes without `<unk>` and decodes back
exactly. The merges are trained on a short embedded text, so the vocabulary stays a few hundred
tokens. Special tokens keep their real spelling and role (bos/eos/pad, image, turn markers); ids are
either pinned at the start of the vocabulary (`leading`, as Mistral/Llama/Gemma do) or appended at
the end (`trailing`, as Qwen does).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Enough text to learn a few hundred merges for English, digits and punctuation; the byte alphabet
# covers everything else, so nothing is ever <unk>.
_CORPUS = """
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
What is written in the image? Read the text in the picture. Describe this image in one sentence.
The answer is 42. The total is 1,234.56 dollars; the date is 2024-05-17 at 09:30.
0123456789 9876543210 00 11 22 33 44 55 66 77 88 99 10 20 30 40 50 60 70 80 90 100 1000
Hello, World! How are you today? I am fine, thank you. Yes / no? (maybe) [ok] {x: 1} <tag>
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p q r s t u v w x y z
user assistant system question answer caption text image picture photo document receipt invoice
"quoted" 'single' `code` #hash $money %percent ^caret &and *star _under -dash +plus =equals ~tilde |pipe \\back
The cat sat on the mat. A red car is parked in front of the house. There are three people in the photo.
"""


def build_tokenizer(
    *,
    leading: list[str],
    trailing: list[str],
    bpe_vocab_size: int = 512,
    bos: str | None = None,
    eos: str,
    pad: str | None = None,
    unk: str | None = None,
    add_bos: bool = False,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str | None = None,
    model_max_length: int = 32768,
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE and wrap it as a transformers fast tokenizer.

    `leading` special tokens get ids 0..len-1 in order, the BPE vocabulary follows, then `trailing`.
    With `add_bos`, encoding prepends `bos` (as Llama/Mistral/Gemma tokenizers do).

    Example:
        >>> tok = build_tokenizer(leading=["<unk>", "<s>", "</s>"], trailing=["<image>"], bos="<s>", eos="</s>")
        >>> tok.decode(tok("Hello, World!")["input_ids"])
        'Hello, World!'
    """
    tok = Tokenizer(models.BPE())  # no unk token: the byte alphabet covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size + len(leading),
        min_frequency=2,
        special_tokens=list(leading),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(list(trailing))
    if add_bos:
        assert bos is not None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in kwargs.items() if v is not None},
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
