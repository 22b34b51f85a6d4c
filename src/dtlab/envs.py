"""Environment registry: reference scores, return scales and evaluation defaults per env.

Reference min/max returns for D4RL normalized scores are D4RL's (``d4rl/infos.py``,
REF_MIN_SCORE / REF_MAX_SCORE, the random and expert policies' returns on the v2 MuJoCo tasks).
dtlab uses the same constants for the Gymnasium v3/v4/v5 versions of those tasks; v5 differs in
minor details from the v2 tasks D4RL measured on, so normalized scores on v5 are comparable but not
identical to published D4RL numbers.

Atari (``ALE/<Game>-v5`` through ``ale-py``, which ships the ROMs): ``make_env`` builds the DT
paper's observations (``make_atari_env``); normalized scores use random and human "gamer" scores,
as the DT paper does (it follows Hafner et al. 2021, DreamerV2).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from dtlab.errors import ConfigError, DtlabWarning, EnvError
from dtlab.spaces import describe_space  # noqa: F401  (its home before dtlab.spaces)


@dataclass(frozen=True)
class EnvInfo:
    """What dtlab knows about an environment family."""

    ref_min_score: float | None  # random-policy return (D4RL normalized score 0)
    ref_max_score: float | None  # expert-policy return (D4RL normalized score 100)
    # Return-to-go divisor (DT paper: 1000 for MuJoCo locomotion); None: not known for the env,
    # fitted to the data (dtlab.data.returns.fitted_return_scale).
    return_scale: float | None
    targets: tuple[float, ...]  # default evaluation target returns (DT paper's gym configs)
    max_ep_len: int  # time limit of the task
    targets_from: str = "the DT paper's"  # whose targets they are, for the console
    # The most an episode can return, where the task bounds it (None: unbounded or unknown).
    max_return: float | None = None


# Targets from the DT paper's gym experiment (experiment.py): hopper 3600/1800,
# halfcheetah 12000/6000, walker2d 5000/2500. Reference scores from D4RL infos.py.
_MUJOCO = {
    "Hopper": EnvInfo(-20.272305, 3234.3, 1000.0, (3600.0, 1800.0), 1000),
    "HalfCheetah": EnvInfo(-280.178953, 12135.0, 1000.0, (12000.0, 6000.0), 1000),
    "Walker2d": EnvInfo(1.629008, 4592.3, 1000.0, (5000.0, 2500.0), 1000),
}

# Pendulum-v1 (the quickstart task): reference min/max are dtlab's own measurements, made with
# `python benchmarks/pendulum_references.py` (gymnasium 1.4.0): mean undiscounted return of 100
# episodes collected by `collect_episodes("Pendulum-v1", policy, num_episodes=100, seed=0)`.
PENDULUM_RANDOM_RETURN = -1240.1  # RandomPolicy (uniform torque); std 298.4 over the 100 episodes
PENDULUM_SCRIPTED_RETURN = -153.1  # PendulumSwingUp(quality=1.0); std 89.9 over the 100 episodes
PENDULUM_REF_MIN = PENDULUM_RANDOM_RETURN
PENDULUM_REF_MAX = PENDULUM_SCRIPTED_RETURN


# CartPole-v1 (discrete actions): min is dtlab's measurement, the mean return of 100 episodes of
# `collect_episodes("CartPole-v1", RandomPolicy(Discrete(2)), num_episodes=100, seed=0)` (std 15.5,
# gymnasium 1.4.0); max is the most the task pays: +1 per step up to its 500-step time limit.
# CartPole-v0 is the same task with a 200-step limit (Gymnasium's registration): the same 100
# random episodes (none longer than 122 steps) give the same 23.93, and at most 200 is paid.
CARTPOLE_RANDOM_RETURN = 23.93
CARTPOLE_MAX_RETURN = 500.0
CARTPOLE_V0_MAX_RETURN = 200.0

# Pendulum-v1 pays -(theta^2 + 0.1 theta_dot^2 + 0.001 torque^2) a step (Gymnasium's
# pendulum.py): never more than 0, so no episode returns more than 0.
PENDULUM_MAX_RETURN = 0.0
# MountainCarContinuous-v0 pays +100 on reaching the flag less 0.1 * action^2 a step, so no
# episode returns more than 100; MountainCar-v0 pays -1 a step until the flag, so at most 0
# (Gymnasium's continuous_mountain_car.py and mountain_car.py; time limits 999 and 200).
MOUNTAIN_CAR_CONTINUOUS_MAX_RETURN = 100.0
MOUNTAIN_CAR_MAX_RETURN = 0.0
# Pong: +1 a point won, -1 a point lost, and a game ends when one side reaches 21 points.
PONG_MAX_RETURN = 21.0


# Atari: the ALE v5 envs end an episode after max_num_frames_per_episode = 108,000 emulator frames
# (ale_py's registration of the v5 ids), i.e. 27,000 agent steps at frame skip 4.
ATARI_MAX_FRAMES = 108_000
ATARI_FRAME_SKIP = 4  # AtariPreprocessing(frame_skip=4); the v5 env's own frameskip is set to 1
ATARI_NOOP_MAX = 30  # up to 30 no-op actions at reset (Mnih et al. 2015; AtariPreprocessing)
ATARI_SCREEN = 84  # 84 x 84 grey frames (Mnih et al. 2015; DT atari/mingpt/trainer_atari.py)
ATARI_STACK = 4  # the last 4 frames per step (Mnih et al. 2015; DT atari/run_dt_atari.py)
ATARI_MAX_STEPS = ATARI_MAX_FRAMES // ATARI_FRAME_SKIP  # 27,000

# (random, gamer) scores: danijar/dreamerv3 baselines.yaml, ``atari57_gamer`` (the Atari-57
# random and human scores DreamerV2, Hafner et al. 2021, normalizes with; the DT paper reports
# "gamer-normalized" scores following it). Targets: the DT Atari code's evaluation returns
# (atari/mingpt/trainer_atari.py, get_returns: Breakout 90, Seaquest 1150, Qbert 14000, Pong 20).
# Return scale 1: the DT Atari code feeds returns-to-go unscaled (create_dataset.py, rtg).
_ATARI = {
    "Breakout": EnvInfo(1.7, 30.5, 1.0, (90.0,), ATARI_MAX_STEPS),
    "Pong": EnvInfo(-20.7, 14.6, 1.0, (20.0,), ATARI_MAX_STEPS, max_return=PONG_MAX_RETURN),
    "Qbert": EnvInfo(163.9, 13455.0, 1.0, (14000.0,), ATARI_MAX_STEPS),
    "Seaquest": EnvInfo(68.4, 42054.7, 1.0, (1150.0,), ATARI_MAX_STEPS),
}


def is_atari(env_id: str) -> bool:
    """Whether ``env_id`` is an ALE id (``ALE/<Game>-v5``), made by ``make_atari_env``."""
    return env_id.startswith("ALE/")


def env_info(env_id: str) -> EnvInfo:
    """Registry entry for a Gymnasium id like ``Hopper-v5``; generic defaults for unknown tasks
    (for other ALE games: return scale 1 and the ALE's 27,000-step limit, no references)."""
    family = env_id.split("/")[-1].split("-")[0]
    if is_atari(env_id):
        return _ATARI.get(family, EnvInfo(None, None, 1.0, (), ATARI_MAX_STEPS))
    if family in _MUJOCO:
        return _MUJOCO[family]
    if family == "Pendulum":
        return EnvInfo(PENDULUM_REF_MIN, PENDULUM_REF_MAX, 100.0, (-150.0, -500.0, -900.0), 200,
                       targets_from="dtlab's defaults", max_return=PENDULUM_MAX_RETURN)
    if family == "CartPole":
        most = CARTPOLE_V0_MAX_RETURN if env_id.endswith("-v0") else CARTPOLE_MAX_RETURN
        return EnvInfo(CARTPOLE_RANDOM_RETURN, most, 100.0, (most, most / 2), int(most),
                       targets_from="dtlab's defaults", max_return=most)
    if family == "MountainCarContinuous":  # no references or targets: only the bound is known
        return EnvInfo(None, None, None, (), 999, max_return=MOUNTAIN_CAR_CONTINUOUS_MAX_RETURN)
    if family == "MountainCar":
        return EnvInfo(None, None, None, (), 200, max_return=MOUNTAIN_CAR_MAX_RETURN)
    return EnvInfo(None, None, None, (), 1000)


def supported_max_target(env_id: str | None, supported_max: float) -> float:
    """The highest target return the data supports in ``env_id``: its
    ``ReturnStats.supported_max``, capped at the most the env can return where that is bounded
    (``EnvInfo.max_return``: Pendulum-v1 0, CartPole-v1 500, CartPole-v0 200,
    MountainCarContinuous 100, MountainCar 0, Pong 21)."""
    ceiling = env_info(env_id).max_return if env_id else None
    return supported_max if ceiling is None else min(supported_max, ceiling)


def reference_scores(env_id: str, recorded_min: float | None = None,
                     recorded_max: float | None = None) -> tuple[float | None, float | None]:
    """The (min, max) returns that define normalized scores for ``env_id``: the registry's
    (D4RL's constants, dtlab's measured Pendulum/CartPole references) when it has them, else the
    ones recorded with a dataset or checkpoint (dtlab's presets, Minari's metadata), else None.
    The one place this precedence is decided."""
    info = env_info(env_id)
    if info.ref_min_score is not None:
        return info.ref_min_score, info.ref_max_score
    if recorded_min is None or recorded_max is None:
        return None, None
    return float(recorded_min), float(recorded_max)


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gymnasium.make`` with a one-line EnvError for ids Gymnasium does not know. ALE ids go
    through ``make_atari_env``; ids that ``gymnasium-robotics`` registers (PointMaze, AntMaze,
    Fetch, ...) are registered on first use. Collection, training checks, evaluation and the
    behaviour policies all make their envs here."""
    if is_atari(env_id):
        return make_atari_env(env_id, **kwargs)
    hint = ""
    try:
        try:
            return gym.make(env_id, **kwargs)
        except gym.error.NameNotFound:
            if not register_robotics():
                hint = " (gymnasium-robotics, for PointMaze/AntMaze: pip install 'dtlab[robotics]')"
                raise
            return gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise EnvError(f"unknown environment '{env_id}': {exc}{hint}") from None
    except ImportError as exc:
        raise EnvError(f"environment '{env_id}' needs a missing package: {exc}") from None


def make_render_env(env_id: str) -> gym.Env:
    """``make_env(env_id, render_mode="rgb_array")``, checked by rendering one frame: ``render()``
    returns (H, W, 3) uint8 frames (MuJoCo: 480 x 480, classic control through pygame surfaces,
    no display needed). Stepping is unchanged: rgb_array envs render only when asked.

    MuJoCo renders through OpenGL, chosen by ``MUJOCO_GL``; its default, GLFW, needs a display.
    Without one (no ``DISPLAY`` or ``WAYLAND_DISPLAY``) and with ``MUJOCO_GL`` unset, it is set
    to ``egl`` (headless, libEGL) for this process; so is ``SDL_VIDEODRIVER`` to ``dummy``
    (pygame draws classic control on surfaces; SDL's display probe would print an error line).
    EnvError, naming MUJOCO_GL, when the frame cannot be rendered (e.g. no libEGL/libOSMesa, or
    pygame missing for classic control)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # Both are read when the first frame is rendered, so setting them now is in time.
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = make_env(env_id, render_mode="rgb_array")
    try:
        env.reset()
        env.render()
    except Exception as exc:  # noqa: BLE001 (OpenGL and pygame failures have no common type)
        env.close()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise EnvError(f"{env_id}: cannot render frames for --video ({type(exc).__name__}: "
                       f"{first_line}); MuJoCo renders headless with MUJOCO_GL=egl (libEGL) or "
                       f"MUJOCO_GL=osmesa (libOSMesa), now MUJOCO_GL="
                       f"{os.environ.get('MUJOCO_GL', '')!r}") from None
    return env


def register_robotics() -> bool:
    """Register gymnasium-robotics' ids (its import does); False when it is not installed. Its
    import prints a notice about Adroit reward versions to stderr (farama_notifications), which
    concerns none of the envs dtlab uses: it is silenced."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
    except ImportError:
        return False
    gym.register_envs(gymnasium_robotics)
    return True


def make_atari_env(env_id: str, **kwargs) -> gym.Env:
    """An ALE game as the DT paper's Atari experiments see it: ``gymnasium.make(env_id,
    frameskip=1)`` (the v5 env, with its sticky actions, repeat_action_probability 0.25),
    ``AtariPreprocessing`` (84 x 84 grey frames, frame skip 4 with max-pooling over the last two
    frames, up to 30 no-op starts, no life-loss terminations), ``FrameStackObservation(4)`` (the
    first frame repeated at reset) and a ``TimeLimit`` of 27,000 agent steps (the ALE's 108,000
    frames; outermost, so it counts agent steps). Observations: (4, 84, 84) uint8.
    ``kwargs`` go to ``gymnasium.make`` (e.g. ``repeat_action_probability``). EnvError for an id
    ale-py does not know, or without ale-py."""
    try:
        import ale_py
    except ImportError as exc:
        raise EnvError(f"environment '{env_id}' needs ale-py: pip install 'dtlab[atari]' "
                       f"({exc})") from None
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TimeLimit

    gym.register_envs(ale_py)
    try:
        env = gym.make(env_id, frameskip=1, **kwargs)
    except gym.error.Error as exc:
        raise EnvError(f"unknown environment '{env_id}': {exc}") from None
    try:
        env = AtariPreprocessing(env, noop_max=ATARI_NOOP_MAX, frame_skip=ATARI_FRAME_SKIP,
                                 screen_size=ATARI_SCREEN, grayscale_obs=True,
                                 terminal_on_life_loss=False, scale_obs=False)
    except gym.error.DependencyNotInstalled as exc:  # OpenCV, for the resize
        env.close()
        raise EnvError(f"environment '{env_id}' needs OpenCV: pip install 'dtlab[atari]' "
                       f"({exc})") from None
    env = FrameStackObservation(env, ATARI_STACK)
    return TimeLimit(env, ATARI_MAX_STEPS)


def actions_outside_bounds(actions: np.ndarray, space: gym.spaces.Space) -> np.ndarray:
    """(N,) bool: actions the space does not hold. Box: rows of ``actions`` (N, act_dim) outside
    it, with a relative tolerance of 1e-5 of the range (float32 round-off in stored data is not a
    violation). Discrete: indices (N,) outside [start, start + n)."""
    if isinstance(space, gym.spaces.Discrete):
        return (actions < space.start) | (actions >= space.start + space.n)
    tol = 1e-5 * np.maximum(1.0, space.high - space.low)
    return np.any((actions < space.low - tol) | (actions > space.high + tol), axis=1)


def time_limit(env_id: str | None) -> int | None:
    """The env's time limit in steps: Gymnasium's registered ``max_episode_steps`` (a registry
    look-up, the env is not made), else dtlab's ``env_info(env_id).max_ep_len`` for the families
    envs.py knows (Hopper, HalfCheetah, Walker2d, Pendulum, CartPole, ALE games), else None
    (unknown id, or registered without a limit; gymnasium-robotics ids such as PointMaze's are
    registered on first use). Never raises for an unknown id."""
    if not env_id:
        return None
    steps = None
    for attempt in range(2):
        try:
            steps = gym.spec(env_id).max_episode_steps
            break
        except Exception:  # gymnasium.error.Error subclasses for unknown or malformed ids
            if attempt or not register_robotics():  # PointMaze & co. register on first use
                break
    if steps is not None:
        return int(steps)
    info = env_info(env_id)
    return info.max_ep_len if info.ref_min_score is not None else None  # a known family


def episode_limit(env, env_id: str, max_steps: int | None, max_ep_len: int) -> tuple[int, int | None]:
    """(steps to run each episode for, the env's standard time limit).

    The limit is ``max_steps``, else the env's time limit (``dtlab.data.diagnostics.time_limit``:
    its registered ``max_episode_steps``, else dtlab's registry), else 1000 steps for an env with
    no limit at all (rollouts must end). Raises ConfigError when episodes could run past the
    model's ``max_ep_len`` (its timestep embedding has no entry for later steps): dtlab never
    clamps timesteps silently.
    """
    spec_limit = env.spec.max_episode_steps if env.spec else None
    limit = max_steps if max_steps is not None else (spec_limit or time_limit(env_id) or 1000)
    if limit > max_ep_len:
        raise ConfigError(
            f"{env_id}: episodes run up to {limit} steps but the model's max_ep_len is {max_ep_len} "
            f"(timesteps beyond it have no embedding); cap episodes with --max-steps {max_ep_len} "
            "or fewer, or train with a larger --model.max-ep-len")
    info = env_info(env_id)
    standard = info.max_ep_len if info.ref_min_score is not None else spec_limit
    return limit, standard


def env_family(env_id: str) -> str:
    """An env id without its module, namespace, version and ALE variant, lower case:
    ``Hopper-v5`` -> ``hopper``, ``ALE/Breakout-v5`` and ``BreakoutNoFrameskip-v4`` ->
    ``breakout``, ``my_mod:MyEnv-v0`` -> ``myenv``, D4RL's ``hopper-medium-v2`` ->
    ``hopper-medium``."""
    name = env_id.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    name = re.sub(r"-v\d+$", "", name)
    return re.sub(r"(NoFrameskip|Deterministic)$", "", name).lower()


def _registered(env_id: str) -> bool:
    """Whether Gymnasium knows ``env_id`` (gymnasium-robotics ids register on first use)."""
    for attempt in range(2):
        try:
            gym.spec(env_id)
            return True
        except Exception:  # gymnasium.error.Error subclasses for unknown or malformed ids
            if attempt or not register_robotics():
                return False
    return False


def env_advice(recorded: str | None, given: str, what: str = "the data was recorded in") -> str:
    """The end of a space-mismatch line (``dtlab.spaces.check_against_env``): the --env to pass.

    ``recorded`` is the env the data or run names, ``what`` how it relates to it ("the data was
    recorded in", "it was trained on"). Gymnasium knows ``recorded`` and it is another env than
    ``given``: pass it. It is ``given`` itself (case aside): the env's spaces changed since, or
    the record is wrong. Nothing recorded, or a name Gymnasium does not know (D4RL's
    ``hopper-medium-v2``): which env --env must be."""
    if recorded and recorded.lower() == given.lower():
        return (f"{what} {given} itself: another version of Gymnasium or of the env's package, or "
                "a wrong env id in the record; pass --env the env it really ran in")
    if recorded and _registered(recorded):
        return f"pass --env {recorded}"
    return f"pass --env the env {what}"


def check_same_env(recorded: str | None, env_id: str, *, what: str, advice: str,
                   noun: str = "the data was recorded in") -> None:
    """Data recorded in one env must not be paired with another that merely has the same spaces:
    ConfigError ``'<what>: <noun> <recorded>, not <env_id>; <advice>'`` when
    ``recorded`` names another env family (``env_family``: Walker2d-v5 for HalfCheetah-v5
    data); one warning when only the version differs (D4RL's Hopper-v2 data in Hopper-v5).
    Silent when nothing was recorded, the ids differ in case only, or for a D4RL dataset name
    that starts with the env's family (``hopper-medium-v2`` for Hopper-v5). A recorded name that
    Gymnasium does not know (D4RL's ``maze2d-umaze-v1``, an unregistered module path) cannot be
    compared: one warning, and the pair is taken as given."""
    if not recorded or recorded.lower() == env_id.lower():
        return
    data, env = env_family(recorded), env_family(env_id)
    if data.startswith(env + "-"):
        return
    if data != env and not _registered(recorded):
        warnings.warn(f"{what}: recorded in {recorded}, a name Gymnasium does not know; paired "
                      f"with {env_id} as given", DtlabWarning, stacklevel=3)
        return
    if data == env:
        warnings.warn(f"{what}: recorded in {recorded}, paired with {env_id} (another version of "
                      "the env): dynamics or rewards may differ", DtlabWarning, stacklevel=3)
        return
    raise ConfigError(f"{what}: {noun} {recorded}, not {env_id}; {advice} (the same spaces do "
                      "not make the same task)")
