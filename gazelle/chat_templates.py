"""The notebook import path: `from gazelle.chat_templates import get_chat_template, ...`."""

from gazelle.data.chat_templates import (  # noqa: F401
    CHAT_TEMPLATES,
    format_conversations,
    get_chat_template,
    standardize_sharegpt,
    to_sharegpt,
    train_on_responses_only,
)
from gazelle.data.formats import alpaca_prompt, load_dataset_file  # noqa: F401
