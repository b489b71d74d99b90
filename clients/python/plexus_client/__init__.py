"""The Plexus gRPC client alone (see the Plexus README, "The Python client").

Built from a Plexus checkout: ``client.py`` is the server package's ``router/client.py`` and
``_generated`` the protobuf code, both with imports rooted here.
"""

from plexus_client.client import *  # noqa: F403
from plexus_client.client import AsyncPlexusClient, PlexusClient, PlexusClientError

__all__ = ["AsyncPlexusClient", "PlexusClient", "PlexusClientError"]
