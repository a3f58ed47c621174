"""The built-in InstructLang world: a task language with a known gold reward, simulated labelers
and a pretraining corpus, on which the whole recipe can be checked (docs/instructlang.md).

Everything here *uses* the library the way a user's own data would: ``datasets`` registers the
data source ``instructlang`` with ``rlhf_jax.data.sources``, ``evaluate`` adds the gold reward to
the library's evaluation, and ``pipeline`` runs the library's stages in order. Importing this
package registers the source.
"""

from rlhf_jax.data import sources
from rlhf_jax.instructlang.datasets import NAME, WorldSource

sources.register(NAME, WorldSource())
