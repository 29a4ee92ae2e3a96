"""``vitfree push DIR ORG/NAME``: upload an exported WinfT (config.json with the window spec,
model.safetensors, README.md) to the Hugging Face Hub."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser('push', help='upload an exported WinfT folder to the Hugging Face Hub',
                       description=__doc__)
    p.add_argument('folder', help='folder written by vitfree.hub.save_pretrained or `vitfree finetune` (its model/)')
    p.add_argument('repo_id', help='Hub repository, ORG/NAME (created if missing)')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--revision', help='branch to push to')
    p.add_argument('--message', help='commit message')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--token', help='Hub token (default: HF_TOKEN or the cached login)')
    p.add_argument('--dry-run', action='store_true', help='check the folder and show what would be uploaded')
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hub import prepare_push, push_to_hub

    plan = prepare_push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.message, create_pr=args.create_pr)
    print(f'{plan.folder} -> hf-hub:{plan.repo_id}: {", ".join(plan.files)}')
    if plan.sha256:
        print(f'model.safetensors matches the SHA-256 config.json records ({plan.sha256[:16]}...)')
    else:
        print('note: config.json records no SHA-256 of model.safetensors (an older export), so it was not checked')
    if args.dry_run:
        print(f'dry run: would call HfApi.create_repo({plan.create_repo}) and upload_folder({plan.upload_folder})')
        return 0
    info = push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                       commit_message=args.message, create_pr=args.create_pr)
    print(f'pushed: {getattr(info, "commit_url", info)}')
    return 0
