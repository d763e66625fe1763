"""Packed SFT batches (synthflaw.training.sft.PackedChatCollator) on chats of known lengths: which chats share a row,
positions that restart at 0 for each chat, the first label of each chat set to -100, padding that trains nothing,
and, on a tiny random Llama, attention that stays inside each chat in the mask the model builds from those
positions: every packed chat's logits equal its logits alone, and the packed loss is the padded batch's loss.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from synthflaw.training.scaffold import IGNORE_INDEX
from synthflaw.training.sft import PackedChatCollator

PAD = 0
# three chats of 5, 3 and 4 tokens; every token labelled (the collator alone sets the first label of each to -100)
CHATS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]


def features(chats=CHATS):
    return [{"input_ids": list(c), "labels": list(c)} for c in chats]


def test_rows_hold_as_few_rows_as_the_tokens_need_filled_evenly():
    collator = PackedChatCollator(PAD, row_tokens=8)
    # 12 tokens -> 2 rows; longest first: 5 -> row 0, 4 -> row 1 (row 0 would hold 9), 3 -> the emptier row 1
    assert collator.rows([5, 3, 4]) == [[0], [2, 1]]
    # 8 tokens in rows of 5 -> 2 rows, filled evenly (2 + 2 each) rather than one full row of 4 + 1
    assert PackedChatCollator(PAD, 5).rows([2, 2, 2, 2]) == [[0, 2], [1, 3]]
    assert PackedChatCollator(PAD, 9).rows([3, 3, 3]) == [[0, 1, 2]]
    assert PackedChatCollator(PAD, 4).rows([6, 1]) == [[0], [1]]  # longer than a row: a row of its own
    assert PackedChatCollator(PAD, 4).rows([3, 3, 3]) == [[0], [1], [2]]  # ceil(9 / 4) = 3 rows from the start
    # 8 tokens -> 2 rows to start with; the 2-token chat fits neither (3 + 2 > 4): a third row is added for it
    assert PackedChatCollator(PAD, 4).rows([3, 3, 2]) == [[0], [1], [2]]
    # 20 tokens in rows of 10 -> 2 rows; the 5 gets a row of its own, and the 3 goes to that emptiest row (5 < 6)
    assert PackedChatCollator(PAD, 10).rows([6, 6, 5, 3]) == [[0], [1], [2, 3]]
    assert PackedChatCollator(PAD, 8).rows([4, 4]) == [[0, 1]]  # exactly full
    assert PackedChatCollator(PAD, 8).rows([]) == []


def test_positions_restart_and_the_first_label_of_each_chat_is_ignored():
    batch = PackedChatCollator(PAD, row_tokens=8)(features())
    # rows [[0], [2, 1]] (above), padded to the longest row, 7 tokens
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, PAD, PAD],
                                           [31, 32, 33, 34, 21, 22, 23]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0],
                                              [0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, 14, 15, IGNORE_INDEX, IGNORE_INDEX],
                                        [IGNORE_INDEX, 32, 33, 34, IGNORE_INDEX, 22, 23]]
    assert batch["use_cache"] is False  # a cache would switch off the detection of packed sequences
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}  # no attention mask: positions say it


def test_labels_already_ignored_stay_ignored():
    chats = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
             {"input_ids": [9, 10], "labels": [9, 10]}]
    batch = PackedChatCollator(PAD, row_tokens=8)(chats)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10]]


@pytest.fixture(scope="module")
def tiny_llama():
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def test_attention_stays_inside_each_chat_in_the_mask_the_model_gets(tiny_llama):
    batch = PackedChatCollator(PAD, row_tokens=8)(features())
    with torch.no_grad():
        packed = tiny_llama(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = [tiny_llama(input_ids=torch.tensor([chat])).logits[0] for chat in CHATS]
    # row 1 holds chat 2 then chat 1: chat 1's logits do not see chat 2's tokens
    torch.testing.assert_close(packed[0, :5], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[1, :4], alone[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[1, 4:7], alone[1], rtol=1e-4, atol=1e-5)


def test_the_packed_loss_is_the_mean_over_the_chats_own_next_token_predictions(tiny_llama):
    batch = PackedChatCollator(PAD, row_tokens=8)(features())
    with torch.no_grad():
        loss = tiny_llama(**batch).loss
        # each chat alone: its mean loss over its n - 1 predicted tokens; the packed loss weighs them by n - 1
        alone = [(tiny_llama(input_ids=torch.tensor([c]), labels=torch.tensor([c])).loss, len(c) - 1) for c in CHATS]
    expected = sum(l * n for l, n in alone) / sum(n for _, n in alone)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
