"""Generate the bundled demo task: restaurant bookings -> one line of JSON.

Why this task: the base SmolLM2-135M-Instruct answers in prose (exact match ~0%), but a LoRA
fine-tune learns the output format, copies names and converts spoken numbers and 12-hour times
within one epoch on a CPU. The generator is deterministic (fixed seed), so the committed JSONL
files can be regenerated bit for bit:

    python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "tunepilot" / "recipes" / "data"
SYSTEM = "Extract the booking as JSON with keys name, guests, day, time (24-hour HH:MM)."

FIRST = [
    "Maria",
    "James",
    "Aiko",
    "Omar",
    "Lena",
    "Carlos",
    "Priya",
    "Tom",
    "Fatima",
    "Lucas",
    "Chloe",
    "Ivan",
    "Zara",
    "Noah",
    "Elena",
    "Kwame",
    "Sofia",
    "Ben",
    "Mei",
    "Hugo",
    "Nadia",
    "Leo",
    "Ingrid",
    "Raj",
    "Olga",
    "Diego",
    "Hana",
    "Felix",
    "Amara",
    "Pablo",
]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Haddad",
    "Fischer",
    "Silva",
    "Patel",
    "Baker",
    "Khan",
    "Moreau",
    "Martin",
    "Petrov",
    "Ali",
    "Brown",
    "Rossi",
    "Mensah",
    "Garcia",
    "Cohen",
    "Wong",
    "Dubois",
    "Novak",
    "Berg",
    "Larsen",
    "Singh",
    "Ivanova",
    "Torres",
    "Kim",
    "Weber",
    "Okafor",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
    11: "eleven",
    12: "twelve",
}
TEMPLATES = [
    "Hi, this is {name}. Could I book a table for {guests} on {day} at {time}?",
    "Table for {guests} please, {day} {time}, under the name {name}.",
    "Hello! {name} here, we are {guests} people and would like to come {day} around {time}.",
    "Can you reserve {day} at {time} for {guests}? Name is {name}.",
    "I'd like a reservation for {guests} guests on {day}, {time}. Thanks, {name}",
    "{name} calling: {guests} of us, {day} evening at {time} if possible.",
    "Book me in for {day} at {time}, party of {guests}, name {name}.",
    "Good morning, could {name} get a table on {day} at {time}? There will be {guests} of us.",
]


def spoken_time(hour: int, minute: int, rng: random.Random) -> str:
    """A 12-hour time the way people write it: '7pm', '7:30 pm', '12:15 PM'."""
    h12 = hour % 12 or 12
    suffix = rng.choice(["pm", "PM", " pm", " p.m."]) if hour >= 12 else rng.choice(["am", " am"])
    if minute == 0 and rng.random() < 0.6:
        return f"{h12}{suffix}"
    return f"{h12}:{minute:02d}{suffix}"


def make_row(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    guests = rng.randint(1, 12)
    day = rng.choice(DAYS)
    hour = rng.choice([11, 12, 13, 14, 17, 18, 19, 20, 21, 22])
    minute = rng.choice([0, 0, 15, 30, 45])
    said_guests = WORDS[guests] if rng.random() < 0.5 else str(guests)
    user = rng.choice(TEMPLATES).format(
        name=name, guests=said_guests, day=day, time=spoken_time(hour, minute, rng)
    )
    answer = json.dumps(
        {"name": name, "guests": guests, "day": day, "time": f"{hour:02d}:{minute:02d}"}
    )
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    rng = random.Random(20261126)
    rows, seen = [], set()
    while len(rows) < 1400:
        row = make_row(rng)
        key = row["messages"][1]["content"]
        if key not in seen:  # no prompt appears twice, so eval rows are never in train
            seen.add(key)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("bookings-train.jsonl", rows[:1280]), ("bookings-eval.jsonl", rows[1280:])):
        with open(OUT / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"wrote {len(part)} rows to {OUT / name}")


if __name__ == "__main__":
    main()
