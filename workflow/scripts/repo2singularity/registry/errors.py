"""The registry's errors: each message is one line naming the registry and image, never a secret."""


class RegistryError(Exception):
    """A registry operation failed; the message is one line and names the registry and image."""


class AuthenticationError(RegistryError):
    """The registry wants credentials that were not found, or refused the ones given."""


class UnreachableError(RegistryError):
    """The registry does not answer: connection refused, timed out, or TLS failed."""


class DigestMismatchError(RegistryError):
    """Content that does not match its digest; nothing of it was kept."""


class InvalidRegistrySetting(RegistryError):
    """A registry setting that cannot work."""
