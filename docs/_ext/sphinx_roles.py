"""A griffe extension for the API reference: the docstrings' reST roles as Markdown.

The docstrings are written for Python's ``help()`` and Sphinx conventions
(``:class:`~eventbus.Topic```, ``:meth:`publish```, ``::`` before an example,
``.. versionadded::``). mkdocstrings renders Markdown, so this rewrites them when the
package is loaded for the docs (the source is untouched): a role naming a public
``eventbus`` object becomes a cross-reference (checked by ``mkdocs build --strict``),
any other role plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|exc|attr|data|obj|mod):`(?P<tilde>~?)(?P<target>[^`]+)`")
_VERSION = re.compile(r"^(?P<indent>\s*)\.\. version(?P<kind>added|changed):: (?P<rest>.*)$", re.M)
_LITERAL = re.compile(r"(?<=\S)::$", re.M)  # "Example::" ends a paragraph before a code block
_BARE_LITERAL = re.compile(r"^(?P<indent>\s*)::$", re.M)


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles and directives in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._public = self._public_paths(pkg)
        self._rewrite(pkg, set())

    def _public_paths(self, pkg: griffe.Module) -> set[str]:
        """Objects the reference pages render (their anchors exist)."""
        paths: set[str] = set()
        for name in ("", "errors", "signals", "sync", "testing", "testing.pytest_plugin"):
            module = pkg if not name else pkg[name]
            prefix = "eventbus" + (f".{name}" if name else "")
            for member_name, member in module.members.items():
                if member_name.startswith("_") or not member.is_public:
                    continue
                paths.add(f"{prefix}.{member_name}")
                if member.is_class or (member.is_alias and member.final_target.is_class):
                    target = member.final_target if member.is_alias else member
                    for sub in target.members:
                        if not sub.startswith("_"):
                            paths.add(f"{prefix}.{member_name}.{sub}")
        return paths

    def _rewrite(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen or obj.is_alias:
            return
        seen.add(id(obj))
        if obj.docstring is not None:
            obj.docstring.value = self._markdown(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member, seen)

    def _markdown(self, text: str, obj: Any) -> str:
        owner = obj if obj.is_class else obj.parent

        def role(match: re.Match[str]) -> str:
            target = match["target"].strip().rstrip("()")
            shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
            candidates = [target]
            if owner is not None and "." not in target:
                public_owner = _public_path(owner)
                if public_owner:
                    candidates.append(f"{public_owner}.{target}")
                candidates.append(f"eventbus.{target}")
            for candidate in candidates:
                if candidate in self._public:
                    return f"[`{shown}`][{candidate}]"
            return f"`{shown}`"

        text = _ROLE.sub(role, text)
        text = _VERSION.sub(
            lambda m: (
                f"{m['indent']}*{'Added' if m['kind'] == 'added' else 'Changed'}"
                f" in version {m['rest']}.*"
            ),
            text,
        )
        text = _BARE_LITERAL.sub("", text)
        return _LITERAL.sub(":", text)


def _public_path(obj: Any) -> str | None:
    """``eventbus.EventBus`` for the class defined in ``eventbus._bus``."""
    path = obj.path
    if path.startswith("eventbus._") and obj.is_class:
        return f"eventbus.{obj.name}"
    return path
