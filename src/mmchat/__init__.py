"""mmchat: a local, private, multimodal chat assistant."""
from .api import LLM, Completion, load
from .chat.session import Chat
from .errors import MMChatError
from .generate import SamplingParams

__all__ = ["Chat", "LLM", "Completion", "MMChatError", "SamplingParams", "load"]
__version__ = "0.1.0"
