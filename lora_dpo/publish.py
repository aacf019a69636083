"""`lora-dpo push`: the run folder made ready for the hub, then uploaded.

Ready means: the kohya-format file written beside the diffusers one (ComfyUI cannot apply the diffusers file's
attention layers, so a hub repo without it serves diffusers users only; a family with no kohya layout known, FLUX.2
klein, goes up with the diffusers file alone), the card refreshed (the repo id in its
snippet, which file is for which tool, the sample grids as its gallery), and `card.hub_problems` empty. `prepare`
does all of it offline, so tests check the folder exactly as `push` would upload it.
"""

from __future__ import annotations

from pathlib import Path

from lora_dpo import __version__, card, export, hub, models


def _check_run_folder(folder: Path) -> None:
    if not (folder / card.ADAPTER_FILE).is_file():
        raise models.ModelError(f"{folder}: no {card.ADAPTER_FILE}: not a finished lora-dpo run folder")


def prepare(folder: Path, repo_id: str) -> Path | None:
    """Write `<run>_kohya.safetensors` from the run's adapter and refresh the card (unless hand-edited: its
    mark removed); raises when the folder is still not ready to upload. Returns the kohya file, None for a family
    with no kohya layout known (FLUX.2 klein: the diffusers file alone goes up)."""
    folder = Path(folder)
    _check_run_folder(folder)
    _, header = export.read_file(folder / card.ADAPTER_FILE)
    family = models.family_of_metadata(header.get("modelspec.architecture", ""))
    kohya_path = None
    if family is None or family.kohya_format:
        # the base recorded in the adapter names the kohya layers (a known hub id reads a shipped config: offline)
        kohya_path = export.export_adapter(folder / card.ADAPTER_FILE, folder / card.kohya_file(folder), "kohya")
    card_path = folder / card.CARD_FILE
    if not card_path.is_file() or card.MARK in card_path.read_text(encoding="utf-8"):
        card.write_model_card(folder, adapter_ref=repo_id)  # the snippet now loads from the hub
    problems = card.hub_problems(folder)
    if problems:
        raise models.ModelError(f"{folder}: not ready to upload: {'; '.join(problems)}")
    return kohya_path


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Prepare the run folder, then upload it as a model repo (created if needed) with huggingface_hub; returns
    its URL. Exactly `card.hub_files(folder)` is sent (the same ignore patterns)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    _check_run_folder(folder)
    if not hub.online():  # at once, not after the export and the client's retries
        raise hub.HubUnavailableError(f"{repo_id}: the upload goes to {hub.OFFLINE_HERE}; connect and run again")
    prepare(folder, repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=card.UPLOAD_IGNORE,
                          commit_message=f"Upload {folder.name} (lora-dpo {__version__})")
    except Exception as err:  # network, login, permissions: the hub's message says which
        raise models.ModelError(f"{repo_id}: upload failed: {str(err).splitlines()[0]} (log in with `hf auth "
                                "login` or set HF_TOKEN)") from None
    return str(url)
